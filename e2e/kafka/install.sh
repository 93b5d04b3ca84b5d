#!/usr/bin/env bash
# Fetches Apache Kafka's broker (org.apache.kafka:kafka_2.13 and its dependencies, from Maven
# Central) into a cache outside the clone, and prints the directory of its jars on stdout:
#
#   SJOB_KAFKA_LIBS=$(bash e2e/kafka/install.sh)
#
# The tests run it as one KRaft node (broker and controller together) on 127.0.0.1:
# src/local/kafka_server.rs. Warm: the jars are there -> exit at once. Cold: about 15 s.
set -euo pipefail

VERSION=${KAFKA_VERSION:-4.4.0}
cache=${SJOB_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sjob/kafka}
root=$cache/kafka-$VERSION
libs=$root/libs

ok() { [[ -f $root/complete ]] && compgen -G "$libs/kafka_2.13-$VERSION.jar" >/dev/null; }
if ok; then echo "$libs"; exit 0; fi

command -v mvn >/dev/null || { echo "kafka: mvn is not installed (apt-get install maven)" >&2; exit 1; }
command -v java >/dev/null || { echo "kafka: java is not installed (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
mkdir -p "$root"
exec 9>"$root/lock"
flock 9
if ok; then echo "$libs"; exit 0; fi
start=$SECONDS
echo "kafka: fetching kafka_2.13 $VERSION …" >&2
cat >"$root/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>sjob.e2e</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-simple</artifactId><version>1.7.36</version></dependency>
  </dependencies>
</project>
POM
rm -rf "$libs.tmp"
mvn -q -B -f "$root/pom.xml" dependency:copy-dependencies -DoutputDirectory="$libs.tmp" -DincludeScope=runtime >&2
rm -rf "$libs"
mv "$libs.tmp" "$libs"
touch "$root/complete"
ok || { echo "kafka: $libs has no kafka_2.13-$VERSION.jar" >&2; exit 1; }
echo "kafka: $(ls "$libs" | wc -l) jars in $libs ($((SECONDS - start)) s)" >&2
echo "$libs"
