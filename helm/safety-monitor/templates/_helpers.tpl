{{/* Chart name. */}}
{{- define "safety-monitor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name: <release>-<chart> unless the release name contains it. */}}
{{- define "safety-monitor.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "safety-monitor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "safety-monitor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "safety-monitor.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "safety-monitor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: safety-monitor
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select the pods carrying the monitor (ours, or vLLM chart's). */}}
{{- define "safety-monitor.podSelector" -}}
{{- if and (not .Values.vllm.enabled) .Values.podSelector -}}
{{ toYaml .Values.podSelector }}
{{- else -}}
{{ include "safety-monitor.selectorLabels" . }}
{{- end -}}
{{- end -}}

{{- define "safety-monitor.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "safety-monitor.fullname" .)) .Values.policy.existingConfigMap -}}
{{- end -}}

{{- define "safety-monitor.bundleConfigMap" -}}
{{- default (printf "%s-bundle" (include "safety-monitor.fullname" .)) .Values.bundle.configMap.name -}}
{{- end -}}

{{- define "safety-monitor.bundlePath" -}}
{{- if eq .Values.bundle.source "image" -}}
{{- .Values.bundle.imagePath -}}
{{- else if or (eq .Values.bundle.source "configMap") (eq .Values.bundle.source "pvc") -}}
{{- .Values.bundle.mountPath -}}
{{- else -}}
{{- fail (printf "bundle.source: expected image, configMap or pvc, found %q" .Values.bundle.source) -}}
{{- end -}}
{{- end -}}

{{/* A probe with its gRPC port set to sidecar.healthPort. */}}
{{- define "safety-monitor.grpcProbe" -}}
{{- $p := deepCopy .probe -}}
{{- if hasKey $p "grpc" -}}
{{- if .tls -}}
{{- $_ := unset $p "grpc" -}}
{{- $_ := set $p "tcpSocket" (dict "port" (int .port)) -}}
{{- else -}}
{{- $_ := set $p.grpc "port" (int .port) -}}
{{- end -}}
{{- end -}}
{{ toYaml $p }}
{{- end -}}

{{/* The plugin's environment for TLS / token (vLLM container). */}}
{{- define "safety-monitor.pluginAccessEnv" -}}
{{- $s := .Values.sidecar -}}
{{- if $s.tls.enabled }}
- name: SAFETY_MONITOR_TLS_CA
  value: /etc/safety-monitor/client-tls/ca.crt
- name: SAFETY_MONITOR_TLS_SERVER_NAME
  value: {{ $s.tls.serverName | quote }}
{{- if $s.tls.mtls }}
- name: SAFETY_MONITOR_TLS_CERT
  value: /etc/safety-monitor/client-tls/tls.crt
- name: SAFETY_MONITOR_TLS_KEY
  value: /etc/safety-monitor/client-tls/tls.key
{{- end }}
{{- end }}
{{- if $s.auth.tokenSecret }}
- name: SAFETY_MONITOR_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $s.auth.tokenSecret }}
      key: {{ $s.auth.tokenKey }}
{{- end }}
{{- end -}}

{{/*
The monitor container. Called with (dict "root" $ "native" bool): native adds
restartPolicy: Always (a native sidecar in initContainers).
*/}}
{{- define "safety-monitor.monitorContainer" -}}
{{- $v := .root.Values -}}
{{- $s := $v.sidecar -}}
- name: safety-monitor
  image: {{ printf "%s:%s" $s.image.repository ($s.image.tag | default .root.Chart.AppVersion) | quote }}
  imagePullPolicy: {{ $s.image.pullPolicy }}
  {{- if .native }}
  restartPolicy: Always
  {{- end }}
  command:
    - safety-monitor
    - --log-level={{ $s.logLevel }}
    - serve
    - --bundle={{ include "safety-monitor.bundlePath" .root }}
    - --policy={{ $v.policy.mountPath }}/{{ $v.policy.policyKey }}
    - --policy-watch-s={{ $v.policy.watchSeconds }}
    - --host=0.0.0.0
    - --port={{ $s.grpcPort }}
    - --health-port={{ $s.healthPort }}
    - --metrics-host=0.0.0.0
    - --metrics-port={{ $s.metricsPort }}
    - --grace-s={{ $s.graceSeconds }}
    - --backend={{ $s.backend }}
    - --torch-threads={{ $s.scorerThreads }}
    - --onnx-threads={{ $s.scorerThreads }}
    {{- if $s.tls.enabled }}
    - --tls-cert=/etc/safety-monitor/tls/tls.crt
    - --tls-key=/etc/safety-monitor/tls/tls.key
    {{- if $s.tls.mtls }}
    - --tls-client-ca=/etc/safety-monitor/tls/ca.crt
    {{- end }}
    {{- end }}
    {{- if $s.auth.tokenSecret }}
    - --token-file=/etc/safety-monitor/token/{{ $s.auth.tokenKey }}
    {{- end }}
    {{- if ge (int $s.adminPort) 0 }}
    - --admin-host=127.0.0.1
    - --admin-port={{ $s.adminPort }}
    {{- end }}
    {{- if $s.auditLog.enabled }}
    - --audit-log={{ $s.auditLog.path }}
    {{- if $s.auditLog.finals }}
    - --audit-finals
    {{- end }}
    {{- end }}
    {{- if $s.auditLog.stdout }}
    - --audit-stdout
    {{- end }}
    {{- include "safety-monitor.alertArgs" .root | nindent 4 }}
    {{- if $v.shm.enabled }}
    - --shm
    - --shm-dir=/dev/shm
    {{- end }}
    {{- range $s.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  ports:
    - name: grpc
      containerPort: {{ $s.grpcPort }}
      protocol: TCP
    - name: grpc-health
      containerPort: {{ $s.healthPort }}
      protocol: TCP
    - name: monitor-metrics
      containerPort: {{ $s.metricsPort }}
      protocol: TCP
  env:
    - name: HOME
      value: /tmp
    # downward API: the pod and namespace labels of the sidecar's own alerts
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: POD_NAMESPACE
      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
    {{- include "safety-monitor.alertEnv" .root | nindent 4 }}
    {{- with $s.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $s.startupProbe }}
  startupProbe:
    {{- include "safety-monitor.grpcProbe" (dict "probe" . "port" $s.healthPort "tls" $s.tls.enabled) | nindent 4 }}
  {{- end }}
  {{- with $s.readinessProbe }}
  readinessProbe:
    {{- include "safety-monitor.grpcProbe" (dict "probe" . "port" $s.healthPort "tls" $s.tls.enabled) | nindent 4 }}
  {{- end }}
  {{- with $s.livenessProbe }}
  livenessProbe:
    {{- include "safety-monitor.grpcProbe" (dict "probe" . "port" $s.healthPort "tls" $s.tls.enabled) | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml $s.resources | nindent 4 }}
  securityContext:
    {{- toYaml $s.securityContext | nindent 4 }}
  volumeMounts:
    - name: policy
      mountPath: {{ $v.policy.mountPath }}
      readOnly: true
    {{- if ne $v.bundle.source "image" }}
    - name: bundle
      mountPath: {{ $v.bundle.mountPath }}
      readOnly: true
      {{- if and (eq $v.bundle.source "pvc") $v.bundle.pvc.subPath }}
      subPath: {{ $v.bundle.pvc.subPath }}
      {{- end }}
    {{- end }}
    - name: monitor-state
      mountPath: {{ dir $s.auditLog.path }}
    - name: monitor-tmp
      mountPath: /tmp
    {{- if $v.shm.enabled }}
    - name: dshm
      mountPath: /dev/shm
      readOnly: true
    {{- end }}
    {{- if $s.tls.enabled }}
    - name: monitor-tls
      mountPath: /etc/safety-monitor/tls
      readOnly: true
    {{- end }}
    {{- if $s.auth.tokenSecret }}
    - name: monitor-token
      mountPath: /etc/safety-monitor/token
      readOnly: true
    {{- end }}
    {{- if and (include "safety-monitor.alertsEnabled" .root) $v.alerts.spool.enabled }}
    - name: alert-spool
      mountPath: {{ $v.alerts.spool.path }}
    {{- end }}
    {{- if and $v.alerts.webhook.secret.existingSecret $v.alerts.webhook.secret.key }}
    - name: webhook-secret
      mountPath: /etc/safety-monitor/webhook
      readOnly: true
    {{- end }}
{{- end -}}

{{/* "true" when the sidecar delivers alerts itself (Alertmanager or webhook). */}}
{{- define "safety-monitor.alertsEnabled" -}}
{{- if or .Values.alerts.alertmanager.urls .Values.alerts.webhook.url .Values.alerts.webhook.urlSecret.name -}}
true
{{- end -}}
{{- end -}}

{{/* Flags of the sidecar's alert delivery (monitor/report/sinks). Secrets never appear
     here: the webhook URL from a Secret comes in through $(SAFETY_MONITOR_WEBHOOK_URL),
     the HMAC key as a mounted file. */}}
{{- define "safety-monitor.alertArgs" -}}
{{- $a := .Values.alerts -}}
{{- range $a.alertmanager.urls }}
- --alertmanager-url={{ . }}
{{- end }}
{{- if $a.webhook.urlSecret.name }}
- --webhook-url=$(SAFETY_MONITOR_WEBHOOK_URL)
{{- else if $a.webhook.url }}
- --webhook-url={{ $a.webhook.url }}
{{- end }}
{{- if and $a.webhook.secret.existingSecret $a.webhook.secret.key }}
- --webhook-secret-file=/etc/safety-monitor/webhook/{{ $a.webhook.secret.key }}
{{- end }}
{{- if include "safety-monitor.alertsEnabled" . }}
{{- if $a.spool.enabled }}
- --alert-spool-dir={{ $a.spool.path }}
- --alert-spool-max-bytes={{ int64 $a.spool.maxBytes }}
{{- end }}
- --alert-timeout-s={{ $a.timeoutSeconds }}
- --alert-resend-s={{ $a.resendSeconds }}
- --alert-resolve-s={{ $a.resolveSeconds }}
- --runbook-url={{ $a.runbookUrl }}
{{- end }}
{{- end -}}

{{- define "safety-monitor.alertEnv" -}}
{{- with .Values.alerts.webhook.urlSecret.name }}
- name: SAFETY_MONITOR_WEBHOOK_URL
  valueFrom: {secretKeyRef: {name: {{ . }}, key: {{ $.Values.alerts.webhook.urlSecret.key }}}}
{{- end }}
{{- end -}}

{{/* The vLLM container's metrics port name: this chart's "http", vLLM chart's
     "container-port" (examples/online_serving/chart-helm), or metrics.vllmPortName. */}}
{{- define "safety-monitor.vllmPortName" -}}
{{- if .Values.metrics.vllmPortName -}}
{{- .Values.metrics.vllmPortName -}}
{{- else if .Values.vllm.enabled -}}
http
{{- else -}}
container-port
{{- end -}}
{{- end -}}
