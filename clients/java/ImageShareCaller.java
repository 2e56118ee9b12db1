import com.google.gson.Gson;
import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import com.imageshare.v1.ImageShareServiceGrpc;
import com.imageshare.v1.ListImageSharesRequest;
import com.imageshare.v1.ListImageSharesResponse;
import com.imageshare.v1.ShareGroup;
import com.imageshare.v1.SharedAccount;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.protobuf.StatusProto;
import java.util.Iterator;
import java.util.Map;
import java.util.concurrent.TimeUnit;

/**
 * Calls imageshare.v1.ImageShareService from Java.
 *
 * <pre>
 *   ImageShareCaller TARGET list REGION IMAGE   the share list: "account ID" lines, then
 *                                               "group NAME" lines and "total N"
 *   ImageShareCaller TARGET health              "health SERVING" (grpc.health.v1 Check)
 * </pre>
 *
 * <p>A failed call prints "status CODE NAME", then "reason REASON" (google.rpc.ErrorInfo) and
 * "field FIELD" lines (google.rpc.BadRequest), and exits 3.
 *
 * <p>It builds against Debian's grpc-java 1.41 with grpc-netty (clients/java/build.sh).
 */
public final class ImageShareCaller {
  /** The recommended service config (clients/README.md). */
  static final String SERVICE_CONFIG_JSON =
      "{\"methodConfig\": [{"
          + "\"name\": [{\"service\": \"imageshare.v1.ImageShareService\"}],"
          + "\"timeout\": \"10s\","
          + "\"maxRequestMessageBytes\": 65536,"
          + "\"maxResponseMessageBytes\": 4194304,"
          + "\"retryPolicy\": {\"maxAttempts\": 3, \"initialBackoff\": \"0.1s\","
          + " \"maxBackoff\": \"1s\", \"backoffMultiplier\": 2,"
          + " \"retryableStatusCodes\": [\"UNAVAILABLE\"]}}],"
          + "\"retryThrottling\": {\"maxTokens\": 10, \"tokenRatio\": 0.1}}";

  public static void main(String[] args) throws Exception {
    if (args.length < 2 || (args[1].equals("list") && args.length != 4)) {
      System.err.println("usage: ImageShareCaller TARGET list REGION IMAGE | TARGET health");
      System.exit(2);
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
        case "health":
          health(channel);
          break;
        default:
          System.err.println("unknown command " + args[1]);
          exit = 2;
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
