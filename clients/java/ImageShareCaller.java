import com.google.gson.Gson;
import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.Timestamp;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import com.imageshare.v1.CheckImageShareRequest;
import com.imageshare.v1.CheckImageShareResponse;
import com.imageshare.v1.ImageShareServiceGrpc;
import com.imageshare.v1.ListImageSharesRequest;
import com.imageshare.v1.ListImageSharesResponse;
import com.imageshare.v1.ShareGroup;
import com.imageshare.v1.SharedAccount;
import com.imageshare.v1.WatchImageSharesRequest;
import com.imageshare.v1.WatchImageSharesResponse;
import io.grpc.Context;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.protobuf.StatusProto;
import java.time.Instant;
import java.util.HashMap;
import java.util.HashSet;
import java.util.Iterator;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;

/**
 * Calls imageshare.v1.ImageShareService from Java.
 *
 * <pre>
 *   ImageShareCaller TARGET list REGION IMAGE   the share list: "account ID" lines, then
 *                                               "group NAME" lines and "total N"
 *   ImageShareCaller TARGET check REGION IMAGE ALIYUN_ID
 *                                               may the account launch the image:
 *                                               "shared true|false", "via SHARE_VIA_...",
 *                                               "shared_time ISO-8601" (when listed with
 *                                               one) and "total N"
 *   ImageShareCaller TARGET watch REGION IMAGE MESSAGES
 *                                               follows the list for MESSAGES messages:
 *                                               each is "snapshot" or "change", then
 *                                               "removed ID", "removed_group NAME",
 *                                               "account ID", "group NAME" lines, "total N"
 *                                               and "held N public true|false" (the state
 *                                               after applying it); "reconnect CODE NAME"
 *                                               when a stream ended UNAVAILABLE
 *   ImageShareCaller TARGET health              "health SERVING" (grpc.health.v1 Check)
 * </pre>
 *
 * <p>A failed call prints "status CODE NAME", then "reason REASON" (google.rpc.ErrorInfo) and
 * "field FIELD" lines (google.rpc.BadRequest), and exits 3.
 *
 * <p>It builds against Debian's grpc-java 1.41 with grpc-netty (clients/java/build.sh).
 */
public final class ImageShareCaller {
  /**
   * The recommended service config (clients/README.md). The entry naming WatchImageShares wins
   * over the service's: watches get no deadline.
   */
  static final String SERVICE_CONFIG_JSON =
      "{\"methodConfig\": [{"
          + "\"name\": [{\"service\": \"imageshare.v1.ImageShareService\"}],"
          + "\"timeout\": \"10s\","
          + "\"maxRequestMessageBytes\": 65536,"
          + "\"maxResponseMessageBytes\": 4194304,"
          + "\"retryPolicy\": {\"maxAttempts\": 3, \"initialBackoff\": \"0.1s\","
          + " \"maxBackoff\": \"1s\", \"backoffMultiplier\": 2,"
          + " \"retryableStatusCodes\": [\"UNAVAILABLE\"]}}, {"
          + "\"name\": [{\"service\": \"imageshare.v1.ImageShareService\","
          + " \"method\": \"WatchImageShares\"}],"
          + "\"maxRequestMessageBytes\": 65536,"
          + "\"maxResponseMessageBytes\": 4194304,"
          + "\"retryPolicy\": {\"maxAttempts\": 3, \"initialBackoff\": \"0.1s\","
          + " \"maxBackoff\": \"1s\", \"backoffMultiplier\": 2,"
          + " \"retryableStatusCodes\": [\"UNAVAILABLE\"]}}],"
          + "\"retryThrottling\": {\"maxTokens\": 10, \"tokenRatio\": 0.1}}";

  static final String USAGE =
      "usage: ImageShareCaller TARGET list REGION IMAGE\n"
          + "       ImageShareCaller TARGET check REGION IMAGE ALIYUN_ID\n"
          + "       ImageShareCaller TARGET watch REGION IMAGE MESSAGES\n"
          + "       ImageShareCaller TARGET health";

  /** The number of arguments of each command, TARGET included. */
  static final Map<String, Integer> ARGUMENTS =
      Map.of("list", 4, "check", 5, "watch", 5, "health", 2);

  public static void main(String[] args) throws Exception {
    if (args.length < 2 || !Integer.valueOf(args.length).equals(ARGUMENTS.get(args[1]))) {
      System.err.println(USAGE);
      System.exit(2);
    }
    int messages = 0;
    if (args[1].equals("watch")) {
      try {
        messages = Integer.parseInt(args[4]);
      } catch (NumberFormatException e) {
        // stays 0: the usage below
      }
      if (messages < 1) {
        System.err.println(USAGE);
        System.exit(2);
      }
    }
    @SuppressWarnings("unchecked")
    Map<String, ?> serviceConfig = new Gson().fromJson(SERVICE_CONFIG_JSON, Map.class);
    ManagedChannel channel =
        ManagedChannelBuilder.forTarget(args[0])
            .usePlaintext()
            .defaultServiceConfig(serviceConfig)
            .enableRetry()
            .keepAliveTime(30, TimeUnit.SECONDS)
            .keepAliveTimeout(10, TimeUnit.SECONDS)
            .build(); // one per process
    int exit = 0;
    try {
      switch (args[1]) {
        case "list":
          list(channel, args[2], args[3]);
          break;
        case "check":
          check(channel, args[2], args[3], args[4]);
          break;
        case "watch":
          watch(channel, args[2], args[3], messages);
          break;
        case "health":
          health(channel);
          break;
        default:
          throw new IllegalArgumentException(args[1]);
      }
    } catch (StatusRuntimeException e) {
      report(e);
      exit = 3;
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.exit(exit);
  }

  /** The accounts of all messages, in order, then the groups and total of the first. */
  static void list(ManagedChannel channel, String region, String image) {
    ImageShareServiceGrpc.ImageShareServiceBlockingStub stub =
        ImageShareServiceGrpc.newBlockingStub(channel).withDeadlineAfter(10, TimeUnit.SECONDS);
    ListImageSharesRequest request =
        ListImageSharesRequest.newBuilder()
            .setRegionId(region)
            .setImageId(image)
            .setPageSize(100)
            .build();
    Iterator<ListImageSharesResponse> responses = stub.listImageShares(request);
    ListImageSharesResponse first = null;
    while (responses.hasNext()) {
      ListImageSharesResponse response = responses.next();
      if (first == null) {
        first = response;
      }
      for (SharedAccount account : response.getAccountsList()) {
        System.out.println("account " + account.getAliyunId());
      }
    }
    for (ShareGroup group : first.getShareGroupsList()) {
      System.out.println("group " + group.getGroup());
    }
    System.out.println("total " + first.getTotalCount());
  }

  /** Whether the account may launch the image, and how. */
  static void check(ManagedChannel channel, String region, String image, String aliyunId) {
    // A StatusRuntimeException: NOT_FOUND (no such image), INVALID_ARGUMENT, ...
    CheckImageShareResponse answer =
        ImageShareServiceGrpc.newBlockingStub(channel)
            .withDeadlineAfter(10, TimeUnit.SECONDS)
            .checkImageShare(
                CheckImageShareRequest.newBuilder()
                    .setRegionId(region)
                    .setImageId(image)
                    .setAliyunId(aliyunId)
                    .build());
    System.out.println("shared " + answer.getShared()); // may the account launch the image?
    // Via SHARE_VIA_ACCOUNT: listed, with the time it was shared (unset when the upstream
    // does not say); via SHARE_VIA_PUBLIC: the image is shared with group "all";
    // SHARE_VIA_UNSPECIFIED: not shared.
    System.out.println("via " + answer.getVia());
    if (answer.hasSharedTime()) {
      Timestamp time = answer.getSharedTime();
      Instant sharedTime = Instant.ofEpochSecond(time.getSeconds(), time.getNanos());
      System.out.println("shared_time " + sharedTime);
    }
    System.out.println("total " + answer.getTotalCount());
  }

  /**
   * Follows the share list for the given number of messages: the snapshot, then each change,
   * applied to the state it holds. A stream that ends UNAVAILABLE (the server drains, or the
   * connection reached its maximum age) is opened again after a backoff.
   */
  static void watch(ManagedChannel channel, String region, String image, int messages)
      throws InterruptedException {
    // No deadline: a watch runs until it ends.
    ImageShareServiceGrpc.ImageShareServiceBlockingStub stub =
        ImageShareServiceGrpc.newBlockingStub(channel);
    WatchImageSharesRequest request =
        WatchImageSharesRequest.newBuilder().setRegionId(region).setImageId(image).build();
    Map<String, SharedAccount> accounts = new HashMap<>();
    Set<String> groups = new HashSet<>();
    long backoffMillis = 100;
    int received = 0;
    while (received < messages) {
      // Cancelling the context ends the stream when we stop first.
      Context.CancellableContext context = Context.current().withCancellation();
      Context previous = context.attach();
      try {
        Iterator<WatchImageSharesResponse> stream = stub.watchImageShares(request);
        while (received < messages) {
          if (!stream.hasNext()) {
            return; // the server ended the watch
          }
          WatchImageSharesResponse msg = stream.next();
          received++;
          backoffMillis = 100;
          if (msg.getSnapshot()) {
            // The first message of every stream: the whole list. After a reconnect,
            // compare it with what you held to learn what changed in between.
            accounts.clear();
            groups.clear();
            System.out.println("snapshot");
          } else {
            System.out.println("change");
          }
          for (String id : msg.getRemovedAliyunIdsList()) {
            accounts.remove(id);
            System.out.println("removed " + id);
          }
          for (String group : msg.getRemovedShareGroupsList()) {
            groups.remove(group);
            System.out.println("removed_group " + group);
          }
          for (SharedAccount account : msg.getAccountsList()) {
            accounts.put(account.getAliyunId(), account); // replaces an account shared again
            System.out.println("account " + account.getAliyunId());
          }
          for (ShareGroup group : msg.getShareGroupsList()) {
            groups.add(group.getGroup()); // "all": the image is public
            System.out.println("group " + group.getGroup());
          }
          System.out.println("total " + msg.getTotalCount());
          System.out.println("held " + accounts.size() + " public " + groups.contains("all"));
        }
      } catch (StatusRuntimeException e) {
        Status.Code code = e.getStatus().getCode();
        if (code != Status.Code.UNAVAILABLE) {
          throw e; // NOT_FOUND: the image was deleted
        }
        System.out.println("reconnect " + code.value() + " " + code);
        Thread.sleep(ThreadLocalRandom.current().nextLong(backoffMillis)); // full jitter
        backoffMillis = Math.min(backoffMillis * 2, 10_000);
      } finally {
        context.detach(previous);
        context.cancel(null);
      }
    }
  }

  static void health(ManagedChannel channel) {
    HealthCheckResponse response =
        HealthGrpc.newBlockingStub(channel)
            .withDeadlineAfter(10, TimeUnit.SECONDS)
            .check(
                HealthCheckRequest.newBuilder()
                    .setService("imageshare.v1.ImageShareService")
                    .build());
    System.out.println("health " + response.getStatus());
  }

  /** The call's status and its rich details (grpc-status-details-bin). */
  static void report(StatusRuntimeException e) throws InvalidProtocolBufferException {
    System.out.println("status " + e.getStatus().getCode().value() + " " + e.getStatus().getCode());
    com.google.rpc.Status status = StatusProto.fromThrowable(e);
    if (status != null) {
      for (Any detail : status.getDetailsList()) {
        if (detail.is(ErrorInfo.class)) {
          // getMetadataMap().get("requestId"): the ECS RequestId for Alibaba Cloud support.
          System.out.println("reason " + detail.unpack(ErrorInfo.class).getReason());
        } else if (detail.is(BadRequest.class)) {
          for (BadRequest.FieldViolation v : detail.unpack(BadRequest.class).getFieldViolationsList()) {
            System.out.println("field " + v.getField());
          }
        }
      }
    }
    System.err.println("ImageShareCaller: " + e.getStatus().getDescription());
  }
}
