// Command imageshare-caller calls imageshare.v1.ImageShareService from Go.
//
//	imageshare-caller TARGET list REGION IMAGE   the share list: "account ID" lines, then
//	                                             "group NAME" lines and "total N"
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
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	imagesharev1 "imageshare/gen/go/imageshare/v1"
)

// The recommended service config (clients/README.md): a 10 s deadline, and retries of
// UNAVAILABLE before the first message.
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
  }],
  "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
}`

func main() {
	if len(os.Args) < 3 || (os.Args[2] == "list" && len(os.Args) != 5) {
		fmt.Fprintln(os.Stderr, "usage: imageshare-caller TARGET list REGION IMAGE | TARGET health")
		os.Exit(2)
	}
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
	switch os.Args[2] {
	case "list":
		err = list(ctx, imagesharev1.NewImageShareServiceClient(conn), os.Args[3], os.Args[4])
	case "health":
		err = health(ctx, healthpb.NewHealthClient(conn))
	default:
		err = fmt.Errorf("unknown command %q", os.Args[2])
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
