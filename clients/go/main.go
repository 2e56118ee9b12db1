// Command imageshare-caller calls imageshare.v1.ImageShareService from Go.
//
//	imageshare-caller TARGET list REGION IMAGE   the share list: "account ID" lines, then
//	                                             "group NAME" lines and "total N"
//	imageshare-caller TARGET check REGION IMAGE ALIYUN_ID
//	                                             may the account launch the image:
//	                                             "shared true|false", "via SHARE_VIA_...",
//	                                             "shared_time RFC3339" (when listed with one)
//	                                             and "total N"
//	imageshare-caller TARGET watch REGION IMAGE MESSAGES
//	                                             follows the list for MESSAGES messages:
//	                                             each is "snapshot" or "change", then
//	                                             "removed ID", "removed_group NAME",
//	                                             "account ID", "group NAME" lines, "total N"
//	                                             and "held N public true|false" (the state
//	                                             after applying it); "reconnect CODE NAME"
//	                                             when a stream ended UNAVAILABLE
//	imageshare-caller TARGET health              "health SERVING" (grpc.health.v1 Check)
//
// A failed call prints "status CODE NAME", then "reason REASON" (google.rpc.ErrorInfo) and
// "field FIELD" lines (google.rpc.BadRequest), and exits 3.
//
// It builds offline against Debian's grpc-go 1.33 (clients/go/build.sh): grpc.Dial with
// grpc.WithInsecure. Newer grpc-go spells these grpc.NewClient and
// grpc.WithTransportCredentials(insecure.NewCredentials()) (clients/README.md).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	imagesharev1 "imageshare/gen/go/imageshare/v1"
)

// The recommended service config (clients/README.md): a 10 s deadline, and retries of
// UNAVAILABLE before the first message. The entry naming WatchImageShares wins over the
// service's: watches get no deadline.
const serviceConfig = `{
  "methodConfig": [{
    "name": [{"service": "imageshare.v1.ImageShareService"}],
    "timeout": "10s",
    "maxRequestMessageBytes": 65536,
    "maxResponseMessageBytes": 4194304,
    "retryPolicy": {
      "maxAttempts": 3,
      "initialBackoff": "0.1s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }, {
    "name": [{"service": "imageshare.v1.ImageShareService", "method": "WatchImageShares"}],
    "maxRequestMessageBytes": 65536,
    "maxResponseMessageBytes": 4194304,
    "retryPolicy": {
      "maxAttempts": 3,
      "initialBackoff": "0.1s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }],
  "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
}`

const usage = `usage: imageshare-caller TARGET list REGION IMAGE
       imageshare-caller TARGET check REGION IMAGE ALIYUN_ID
       imageshare-caller TARGET watch REGION IMAGE MESSAGES
       imageshare-caller TARGET health`

func main() {
	argc := map[string]int{"list": 5, "check": 6, "watch": 6, "health": 3}
	if len(os.Args) < 3 || len(os.Args) != argc[os.Args[2]] {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	var messages int
	if os.Args[2] == "watch" {
		n, err := strconv.Atoi(os.Args[5])
		if err != nil || n < 1 {
			fmt.Fprintln(os.Stderr, usage)
			os.Exit(2)
		}
		messages = n
	}
	rand.Seed(time.Now().UnixNano()) // for the reconnect jitter (Go 1.20+ seeds it itself)
	// One connection per process, with keepalive so a dead one is noticed.
	conn, err := grpc.Dial(os.Args[1],
		grpc.WithInsecure(),
		grpc.WithDefaultServiceConfig(serviceConfig),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel() // also cancels the stream if we return early
	client := imagesharev1.NewImageShareServiceClient(conn)
	switch os.Args[2] {
	case "list":
		err = list(ctx, client, os.Args[3], os.Args[4])
	case "check":
		err = check(ctx, client, os.Args[3], os.Args[4], os.Args[5])
	case "watch":
		err = watch(client, os.Args[3], os.Args[4], messages)
	case "health":
		err = health(ctx, healthpb.NewHealthClient(conn))
	}
	if err != nil {
		report(err)
		conn.Close()
		os.Exit(3)
	}
}

// list prints the share list: the accounts of all messages, in order, then the groups and
// the total from the first message.
func list(ctx context.Context, client imagesharev1.ImageShareServiceClient, region, image string) error {
	stream, err := client.ListImageShares(ctx, &imagesharev1.ListImageSharesRequest{
		RegionId: region, ImageId: image, PageSize: 100})
	if err != nil {
		return err
	}
	var first *imagesharev1.ListImageSharesResponse
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if first == nil {
			first = resp
		}
		for _, account := range resp.GetAccounts() {
			fmt.Println("account", account.GetAliyunId())
		}
	}
	for _, group := range first.GetShareGroups() {
		fmt.Println("group", group.GetGroup())
	}
	fmt.Println("total", first.GetTotalCount())
	return nil
}

// check prints whether the account may launch the image, and how.
func check(ctx context.Context, client imagesharev1.ImageShareServiceClient, region, image, aliyunID string) error {
	answer, err := client.CheckImageShare(ctx, &imagesharev1.CheckImageShareRequest{
		RegionId: region, ImageId: image, AliyunId: aliyunID})
	if err != nil {
		return err // status.Code(err): codes.NotFound (no such image), codes.InvalidArgument, ...
	}
	fmt.Println("shared", answer.GetShared()) // may the account launch the image?
	// Via SHARE_VIA_ACCOUNT: listed, with the time it was shared (unset when the upstream
	// does not say); via SHARE_VIA_PUBLIC: the image is shared with group "all";
	// SHARE_VIA_UNSPECIFIED: not shared.
	fmt.Println("via", answer.GetVia())
	if answer.GetSharedTime() != nil {
		fmt.Println("shared_time", answer.GetSharedTime().AsTime().Format(time.RFC3339Nano))
	}
	fmt.Println("total", answer.GetTotalCount())
	return nil
}

// watch follows the share list for the given number of messages: the snapshot, then each
// change, applied to the state it holds. A stream that ends UNAVAILABLE (the server drains,
// or the connection reached its maximum age) is opened again after a backoff.
func watch(client imagesharev1.ImageShareServiceClient, region, image string, messages int) error {
	// No deadline: a watch runs until it ends. cancel ends the stream when we stop first.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	accounts := map[string]*imagesharev1.SharedAccount{}
	groups := map[string]bool{}
	backoff := 100 * time.Millisecond
	for received := 0; received < messages; {
		stream, err := client.WatchImageShares(ctx, &imagesharev1.WatchImageSharesRequest{
			RegionId: region, ImageId: image})
		for err == nil && received < messages {
			var msg *imagesharev1.WatchImageSharesResponse
			if msg, err = stream.Recv(); err != nil {
				break
			}
			received++
			backoff = 100 * time.Millisecond
			if msg.GetSnapshot() {
				// The first message of every stream: the whole list. After a reconnect,
				// compare it with what you held to learn what changed in between.
				accounts, groups = map[string]*imagesharev1.SharedAccount{}, map[string]bool{}
				fmt.Println("snapshot")
			} else {
				fmt.Println("change")
			}
			for _, id := range msg.GetRemovedAliyunIds() {
				delete(accounts, id)
				fmt.Println("removed", id)
			}
			for _, group := range msg.GetRemovedShareGroups() {
				delete(groups, group)
				fmt.Println("removed_group", group)
			}
			for _, account := range msg.GetAccounts() {
				accounts[account.GetAliyunId()] = account // replaces an account shared again
				fmt.Println("account", account.GetAliyunId())
			}
			for _, group := range msg.GetShareGroups() {
				groups[group.GetGroup()] = true // "all": the image is public
				fmt.Println("group", group.GetGroup())
			}
			fmt.Println("total", msg.GetTotalCount())
			fmt.Println("held", len(accounts), "public", groups["all"])
		}
		if err == nil || errors.Is(err, io.EOF) {
			return nil // the last message we wanted, or the server ended the watch
		}
		if status.Code(err) != codes.Unavailable {
			return err // codes.NotFound: the image was deleted
		}
		fmt.Println("reconnect", int(status.Code(err)), status.Code(err))
		time.Sleep(time.Duration(rand.Int63n(int64(backoff)))) // full jitter
		if backoff *= 2; backoff > 10*time.Second {
			backoff = 10 * time.Second
		}
	}
	return nil
}

func health(ctx context.Context, client healthpb.HealthClient) error {
	resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: "imageshare.v1.ImageShareService"})
	if err != nil {
		return err
	}
	fmt.Println("health", resp.GetStatus())
	return nil
}

// report prints a call's status and its rich details.
func report(err error) {
	st := status.Convert(err)
	fmt.Println("status", int(st.Code()), st.Code())
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			// metadata["requestId"]: the ECS RequestId to quote to Alibaba Cloud support.
			fmt.Println("reason", d.GetReason())
		case *errdetails.BadRequest:
			for _, violation := range d.GetFieldViolations() {
				fmt.Println("field", violation.GetField())
			}
		}
	}
	fmt.Fprintln(os.Stderr, "imageshare-caller:", st.Message())
}
