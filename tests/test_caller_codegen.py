"""Go and Java caller stubs generate offline, deterministically, and the Java ones compile and run.

Callers in Go and Java generate their own stubs; this proves the offline path documented in
clients/README.md (scripts/gen_callers.sh with Debian's plugins) works for the proto as it is
today. The Go stubs are checked by content here; tests/test_polyglot_callers.py compiles
both languages' stubs into programs and calls the service with them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATE = ROOT / "scripts" / "gen_callers.sh"
GO_DIR = Path("go") / "imageshare" / "v1"
JAVA_DIR = Path("java") / "com" / "imageshare" / "v1"
JAVA_JARS = [
    "protobuf",
    "grpc-api",
    "grpc-context",
    "grpc-stub",
    "grpc-protobuf",
    "grpc-protobuf-lite",
    "geronimo-annotation-1.3-spec",
    "guava",
]
JAVA_CHECK = """\
import com.imageshare.v1.ImageShareServiceGrpc;
import com.imageshare.v1.ListImageSharesRequest;
import io.grpc.MethodDescriptor;

public class CallerCheck {
  public static void main(String[] args) throws Exception {
    MethodDescriptor<ListImageSharesRequest, ?> m =
        ImageShareServiceGrpc.getListImageSharesMethod();
    ListImageSharesRequest request = ListImageSharesRequest.newBuilder()
        .setRegionId("cn-hangzhou").setImageId("m-demo0000001").setPageSize(100).build();
    ListImageSharesRequest back = m.parseRequest(m.streamRequest(request));
    System.out.println(m.getFullMethodName() + " " + m.getType() + " "
        + back.getRegionId() + " " + back.getImageId() + " " + back.getPageSize());
  }
}
"""


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stubs generated from a subdirectory, as a developer might run it.

    The plugins and jars are installed by ``make bootstrap`` (scripts/bootstrap.sh).
    """
    out = tmp_path_factory.mktemp("callers")
    run("bash", GENERATE, out, cwd=ROOT / "protos")
    return out


def test_go_stubs_honour_go_package_and_carry_the_service(generated: Path) -> None:
    messages = (generated / GO_DIR / "image_share.pb.go").read_text()
    service = (generated / GO_DIR / "image_share_grpc.pb.go").read_text()
    assert "package imagesharev1" in messages
    assert "type ListImageSharesRequest struct" in messages
    assert "type SharedAccount struct" in messages
    assert "type ImageShareServiceClient interface" in service
    assert "func NewImageShareServiceClient(" in service
    assert "ListImageShares(ctx context.Context, in *ListImageSharesRequest" in service
    assert '"/imageshare.v1.ImageShareService/ListImageShares"' in service


def test_java_stubs_land_in_the_java_package(generated: Path) -> None:
    java = generated / JAVA_DIR
    for name in (
        "ImageShareServiceGrpc",
        "ListImageSharesRequest",
        "ListImageSharesResponse",
        "SharedAccount",
        "ShareGroup",
        "CacheStatus",
        "ImageShareProto",
    ):
        source = (java / f"{name}.java").read_text()
        assert "package com.imageshare.v1;" in source, name
    grpc = (java / "ImageShareServiceGrpc.java").read_text()
    assert "getListImageSharesMethod()" in grpc
    assert "MethodDescriptor.MethodType.SERVER_STREAMING" in grpc


def test_generation_is_deterministic(generated: Path, tmp_path: Path) -> None:
    (tmp_path / "go").mkdir()
    (tmp_path / "go" / "stale.pb.go").write_text("package stale\n")
    run("bash", GENERATE, tmp_path)
    assert tree(tmp_path) == tree(generated)


def test_java_stubs_compile_and_describe_the_rpc(generated: Path, tmp_path: Path) -> None:
    classpath = ":".join(f"/usr/share/java/{jar}.jar" for jar in JAVA_JARS)
    sources = sorted(str(p) for p in (generated / JAVA_DIR).glob("*.java"))
    classes = tmp_path / "classes"
    run("javac", "-nowarn", "-d", classes, "-cp", classpath, *sources)
    assert (classes / "com" / "imageshare" / "v1" / "ImageShareServiceGrpc.class").is_file()
    check = tmp_path / "CallerCheck.java"
    check.write_text(JAVA_CHECK)
    done = run("java", "-cp", f"{classpath}:{classes}", check)
    assert done.stdout.split() == [
        "imageshare.v1.ImageShareService/ListImageShares",
        "SERVER_STREAMING",
        "cn-hangzhou",
        "m-demo0000001",
        "100",
    ]
