{{/*
Names and labels follow the Helm best-practice conventions (app.kubernetes.io/*).
*/}}

{{- define "imageshare.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imageshare.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "imageshare.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imageshare.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imageshare.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "imageshare.labels" -}}
helm.sh/chart: {{ include "imageshare.chart" . }}
{{ include "imageshare.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: imageshare
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "imageshare.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imageshare.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "imageshare.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Label that lets a pod through the NetworkPolicy to the gRPC port. */}}
{{- define "imageshare.clientLabel" -}}
{{ include "imageshare.fullname" . }}-client
{{- end }}

{{/* RRSA wired by the chart itself (no webhook): needs both ARNs. */}}
{{- define "imageshare.rrsaExplicit" -}}
{{- if and .Values.rrsa.enabled .Values.rrsa.roleArn .Values.rrsa.oidcProviderArn }}true{{ end }}
{{- end }}

{{/* The chart owns an AccessKey Secret only when nothing better is configured. */}}
{{- define "imageshare.ownsCredentialsSecret" -}}
{{- if and .Values.credentials.accessKeyId (not .Values.credentials.existingSecret) (not .Values.rrsa.enabled) }}true{{ end }}
{{- end }}

{{- define "imageshare.credentialsSecretName" -}}
{{- if .Values.credentials.existingSecret }}
{{- .Values.credentials.existingSecret }}
{{- else if (include "imageshare.ownsCredentialsSecret" .) }}
{{- include "imageshare.fullname" . }}-credentials
{{- end }}
{{- end }}

{{/* Redis is configured when either source of its URL is set. */}}
{{- define "imageshare.redisEnabled" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{- define "imageshare.ownsRedisSecret" -}}
{{- if and .Values.redis.url (not .Values.redis.existingSecret) }}true{{ end }}
{{- end }}

{{/* Where the CA of redis.caSecret is mounted; the Redis URL names it in ssl_ca_certs. */}}
{{- define "imageshare.redisCaDir" -}}
/etc/imageshare/redis-ca
{{- end }}

{{- define "imageshare.redisCaFile" -}}
{{ include "imageshare.redisCaDir" . }}/ca.crt
{{- end }}

{{/* Port the kubelet probes: the plaintext health port when TLS is on, else gRPC. */}}
{{- define "imageshare.probePort" -}}
{{- if .Values.tls.enabled }}{{ .Values.tls.healthPort }}{{ else }}{{ .Values.containerPorts.grpc }}{{ end }}
{{- end }}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "imageshare.validate" -}}
{{- if and .Values.rrsa.enabled (not .Values.rrsa.roleName) (not (and .Values.rrsa.roleArn .Values.rrsa.oidcProviderArn)) }}
{{- fail "rrsa.enabled needs rrsa.roleName (ACK pod-identity webhook) or both rrsa.roleArn and rrsa.oidcProviderArn" }}
{{- end }}
{{- if and .Values.rrsa.enabled (or .Values.credentials.accessKeyId .Values.credentials.existingSecret) }}
{{- fail "rrsa.enabled and static credentials are mutually exclusive: RRSA exists so no AccessKey is stored" }}
{{- end }}
{{- if and .Values.credentials.accessKeyId (not .Values.credentials.accessKeySecret) }}
{{- fail "credentials.accessKeyId needs credentials.accessKeySecret" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName" }}
{{- end }}
{{- if and .Values.tls.enabled (eq (int .Values.tls.healthPort) (int .Values.containerPorts.grpc)) }}
{{- fail "tls.healthPort must differ from containerPorts.grpc" }}
{{- end }}
{{- if and .Values.redis.caSecret (not (include "imageshare.redisEnabled" .)) }}
{{- fail "redis.caSecret needs redis.url or redis.existingSecret" }}
{{- end }}
{{- if and .Values.redis.caSecret .Values.redis.url (not .Values.redis.existingSecret) }}
{{- if not (and (hasPrefix "rediss://" .Values.redis.url) (contains (printf "ssl_ca_certs=%s" (include "imageshare.redisCaFile" .)) .Values.redis.url)) }}
{{- fail (printf "redis.caSecret needs a rediss:// redis.url ending in ?ssl_ca_certs=%s, or the client will not trust the CA" (include "imageshare.redisCaFile" .)) }}
{{- end }}
{{- end }}
{{- $drain := add .Values.lifecycle.preStopSleepSeconds .Values.config.gracePeriodSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + config.gracePeriodSeconds (%d)" (int .Values.terminationGracePeriodSeconds) (int $drain)) }}
{{- end }}
{{- end }}
