{{/* The chart's name, and the release's full name (at most 63 characters). */}}
{{- define "pushstream.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pushstream.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "pushstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pushstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pushstream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pushstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pushstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pushstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pushstream.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret with provider credentials: an existing one or the chart's. */}}
{{- define "pushstream.credentialsSecret" -}}
{{- if .Values.credentials.secretName }}
{{- .Values.credentials.secretName }}
{{- else if .Values.credentials.files }}
{{- printf "%s-credentials" (include "pushstream.fullname" .) }}
{{- end }}
{{- end }}

{{/* The pod's grace period: above the worker's shutdown timeout plus the
5 s the worker allows itself past it before it exits on its own. */}}
{{- define "pushstream.gracePeriod" -}}
{{- $timeout := int .Values.config.shutdownTimeoutSeconds }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- if eq $grace 0 }}
{{- $grace = add $timeout 30 }}
{{- end }}
{{- if le $grace (add $timeout 5) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be above config.shutdownTimeoutSeconds + 5 (%d)" $grace (add $timeout 5)) }}
{{- end }}
{{- $grace }}
{{- end }}

{{/*
Kafka connection settings as env entries: used by the workers and by the
topics Job, which runs as a hook before the ConfigMap exists.
*/}}
{{- define "pushstream.kafkaEnv" -}}
- name: PUSHSTREAM_KAFKA_BOOTSTRAP
  value: {{ .Values.config.kafkaBootstrap | quote }}
- name: PUSHSTREAM_TOPIC_PREFIX
  value: {{ .Values.config.topicPrefix | quote }}
- name: PUSHSTREAM_PARTITIONS
  value: {{ .Values.config.partitions | quote }}
- name: PUSHSTREAM_SEND_PARTITIONS
  value: {{ .Values.config.sendPartitions | quote }}
- name: PUSHSTREAM_REPLICATION_FACTOR
  value: {{ .Values.config.replicationFactor | quote }}
- name: PUSHSTREAM_KAFKA_SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
{{- with .Values.kafka.sasl }}
{{- if .mechanism }}
- name: PUSHSTREAM_KAFKA_SASL_MECHANISM
  value: {{ .mechanism | quote }}
{{- end }}
{{- if .username }}
- name: PUSHSTREAM_KAFKA_SASL_USERNAME
  value: {{ .username | quote }}
{{- end }}
{{- if .passwordSecret.name }}
- name: PUSHSTREAM_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .passwordSecret.name }}
      key: {{ .passwordSecret.key }}
{{- end }}
{{- end }}
{{- with .Values.kafka.tls }}
{{- if .secretName }}
{{- if .caFile }}
- name: PUSHSTREAM_KAFKA_SSL_CAFILE
  value: {{ printf "/etc/pushstream/kafka-tls/%s" .caFile | quote }}
{{- end }}
{{- if .certFile }}
- name: PUSHSTREAM_KAFKA_SSL_CERTFILE
  value: {{ printf "/etc/pushstream/kafka-tls/%s" .certFile | quote }}
{{- end }}
{{- if .keyFile }}
- name: PUSHSTREAM_KAFKA_SSL_KEYFILE
  value: {{ printf "/etc/pushstream/kafka-tls/%s" .keyFile | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Provider apps with their credential files under the mounted folder. */}}
{{- define "pushstream.apps" -}}
{{- $apps := list }}
{{- range .apps }}
{{- $app := deepCopy . }}
{{- range $field := list "key_file" "cert_file" "service_account_file" "client_secret_file" }}
{{- $path := get $app $field }}
{{- if and $path (not (hasPrefix "/" $path)) }}
{{- $_ := set $app $field (printf "/etc/pushstream/credentials/%s" $path) }}
{{- end }}
{{- end }}
{{- $apps = append $apps $app }}
{{- end }}
{{- toJson $apps }}
{{- end }}
