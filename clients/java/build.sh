#!/usr/bin/env bash
# Build clients/java into OUTDIR/classes, offline, with Debian's jars (make bootstrap:
# libgrpc-java 1.41, libnetty-java, libperfmark-java, libgoogle-gson-java,
# libgoogle-common-protos-java, libprotobuf-java, protobuf-compiler-grpc-java-plugin, a JDK),
# and write OUTDIR/imageshare-caller, which runs it with the full runtime classpath.
#
#   clients/java/build.sh OUTDIR
#
# The stubs come from scripts/gen_callers.sh (into OUTDIR/gen): java/ for imageshare.v1,
# java-debian/ for the error details and health stubs Debian's jars lack, compiled into
# the same classes folder, which goes ahead of the jars on the classpath (so ErrorInfo is
# found although proto-google-common-protos 1.16 has no such class).
set -euo pipefail

if [ "$#" -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
jars=/usr/share/java

# Everything a live call loads: without perfmark, NoClassDefFoundError io/perfmark/PerfMark;
# without grpc-netty, ProviderNotFoundException (Debian has no grpc-okhttp or
# grpc-netty-shaded).
classpath=""
for jar in protobuf grpc-api grpc-context grpc-core grpc-stub grpc-protobuf \
    grpc-protobuf-lite grpc-netty netty-buffer netty-codec netty-codec-http netty-codec-http2 \
    netty-codec-socks netty-common netty-handler netty-handler-proxy netty-resolver \
    netty-transport netty-transport-native-unix-common netty-transport-native-epoll guava \
    gson perfmark-api proto-google-common-protos geronimo-annotation-1.3-spec; do
    if [ ! -f "$jars/$jar.jar" ]; then
        echo "$jars/$jar.jar is missing: run make bootstrap" >&2
        exit 1
    fi
    classpath=$classpath:$jars/$jar.jar
done
classpath=${classpath#:}

"$root/scripts/gen_callers.sh" "$out/gen"

rm -rf "$out/classes"
mkdir -p "$out/classes"
find "$out/gen/java" "$out/gen/java-debian" -name '*.java' | LC_ALL=C sort >"$out/sources"
echo "$root/clients/java/ImageShareCaller.java" >>"$out/sources"
javac -nowarn -encoding UTF-8 -d "$out/classes" -cp "$classpath" "@$out/sources"

# A short-lived command: the client compiler alone and the serial collector start it with a
# quarter less CPU than the server-class defaults.
cat >"$out/imageshare-caller" <<EOF
#!/bin/sh
exec java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:-UsePerfData \\
    -cp "$out/classes:$classpath" ImageShareCaller "\$@"
EOF
chmod +x "$out/imageshare-caller"
