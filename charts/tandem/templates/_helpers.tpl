{{/* Names, labels and shared pieces of the Tandem chart. */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" . }}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component's resources; call with (dict "root" $ "component" "router"). */}}
{{- define "tandem.componentLabels" -}}
{{ include "tandem.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "root" $ "component" "router"). */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels that select every Tandem pod of the release (Redis clients). */}}
{{- define "tandem.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Role labels of worker pods: used by NetworkPolicy peers. Call with (dict "prefill" bool "decode" bool). */}}
{{- define "tandem.roleLabels" -}}
tandem.dev/worker: "true"
{{- if .prefill }}
tandem.dev/prefill: "true"
{{- end }}
{{- if .decode }}
tandem.dev/decode: "true"
{{- end }}
{{- end -}}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tandem.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* Checkpoint directory seen by the Tandem containers. */}}
{{- define "tandem.modelDir" -}}
{{- if eq .Values.model.source "bundled" -}}
{{- .Values.model.bundledDir -}}
{{- else if .Values.model.subdir -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.subdir) -}}
{{- else -}}
{{- .Values.model.mountPath -}}
{{- end -}}
{{- end -}}

{{/* Redis: host, port, whether a password is used, the Secret holding it. */}}
{{- define "tandem.redisHost" -}}
{{- if .Values.redis.internal.enabled -}}
{{- printf "%s-redis" (include "tandem.fullname" .) -}}
{{- else -}}
{{- .Values.redis.external.host -}}
{{- end -}}
{{- end -}}

{{- define "tandem.redisPort" -}}
{{- if .Values.redis.internal.enabled -}}
{{- .Values.redis.internal.port -}}
{{- else -}}
{{- .Values.redis.external.port -}}
{{- end -}}
{{- end -}}

{{- define "tandem.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "tandem.fullname" .)) -}}
{{- end -}}

{{/* The Redis URL; the password is expanded by Kubernetes from $(REDIS_PASSWORD). */}}
{{- define "tandem.redisUrl" -}}
{{- $scheme := ternary "rediss" "redis" .Values.redis.tls -}}
{{- $auth := "" -}}
{{- if .Values.redis.auth.enabled -}}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" .Values.redis.auth.username -}}
{{- end -}}
{{- printf "%s://%s%s:%v/%v" $scheme $auth (include "tandem.redisHost" .) (include "tandem.redisPort" .) .Values.redis.db -}}
{{- end -}}

{{/* REDIS_PASSWORD from its Secret (nothing without auth). */}}
{{- define "tandem.redisPasswordEnv" -}}
{{- if .Values.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.redisSecretName" . }}
      key: {{ .Values.redis.auth.existingSecretKey }}
{{- end }}
{{- end -}}

{{/*
Environment of a Tandem container; call with (dict "root" $ "role" "router").
The downward API gives the pod name (worker id), namespace and IP (registered address).
*/}}
{{- define "tandem.env" -}}
{{- $root := .root -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- include "tandem.redisPasswordEnv" $root }}
- name: TANDEM_REDIS_URL
  value: {{ include "tandem.redisUrl" $root | quote }}
{{- with $root.Values.otel }}
{{- if .enabled }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "%s-%s" .serviceNamePrefix $.role | quote }}
{{- if .endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
{{- end }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .protocol | quote }}
- name: OTEL_TRACES_EXPORTER
  value: {{ .tracesExporter | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
{{- if .samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerArg | quote }}
{{- end }}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" "service.instance.id=$(POD_NAME)" (printf "service.namespace=%s" $root.Release.Name) (printf "tandem.role=%s" $.role) }}
{{- range $key := keys .resourceAttributes | sortAlpha }}
{{- $attrs = append $attrs (printf "%s=%v" $key (index $root.Values.otel.resourceAttributes $key)) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* securityContext of a Tandem container. */}}
{{- define "tandem.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/* Native gRPC probes (grpc.health.v1, service ""); call with (dict "port" N "probes" .probes). */}}
{{- define "tandem.grpcProbes" -}}
{{- range $kind := list "startup" "readiness" "liveness" }}
{{ $kind }}Probe:
  grpc:
    port: {{ $.port }}
  {{- toYaml (index $.probes $kind) | nindent 2 }}
{{- end }}
{{- end -}}

{{/* preStop sleep; call with the pool's values. */}}
{{- define "tandem.lifecycle" -}}
{{- if gt (int .preStopSleepSeconds) 0 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ .preStopSleepSeconds }}"]
{{- end }}
{{- end -}}

{{/* Resources with nvidia.com/gpu added; call with (dict "resources" map "gpus" N). */}}
{{- define "tandem.gpuResources" -}}
{{- $res := deepCopy (.resources | default dict) -}}
{{- if gt (int .gpus) 0 -}}
{{- $requests := get $res "requests" | default dict -}}
{{- $limits := get $res "limits" | default dict -}}
{{- $_ := set $requests "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $res "requests" $requests -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- if .claim -}}
{{- $_ := set $res "claims" (list (dict "name" .claim)) -}}
{{- end -}}
{{- if $res }}
resources:
  {{- toYaml $res | nindent 2 }}
{{- else }}
resources: {}
{{- end }}
{{- end -}}

{{/* Pod scheduling fields; call with (dict "root" $ "pool" .Values.prefill "component" "prefill"). */}}
{{- define "tandem.scheduling" -}}
{{- with .pool.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .pool.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .pool.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .pool.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range .pool.topologySpreadConstraints }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "tandem.selectorLabels" (dict "root" $.root "component" $.component) | fromYaml)) }}
{{- end }}
  - {{ toYaml $c | nindent 4 | trim }}
{{- end }}
{{- end }}
{{- with .pool.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .pool.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* Pod-level fields shared by every Tandem pod. */}}
{{- define "tandem.podCommon" -}}
serviceAccountName: {{ include "tandem.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod annotations: config checksum, Prometheus scrape hints; call with (dict "root" $ "pool" map "port" N). */}}
{{- define "tandem.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .pool.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes for /tmp, /dev/shm and the model; call with (dict "root" $ "shmSize" "1Gi"). */}}
{{- define "tandem.volumes" -}}
{{- $model := .root.Values.model -}}
volumes:
  - name: tmp
    emptyDir:
      sizeLimit: {{ .root.Values.tmpSizeLimit }}
{{- if .shmSize }}
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ .shmSize }}
{{- end }}
{{- if eq $model.source "pvc" }}
  - name: model
    persistentVolumeClaim:
      claimName: {{ $model.pvc.claimName }}
      readOnly: {{ $model.pvc.readOnly }}
{{- else if eq $model.source "hostPath" }}
  - name: model
    hostPath:
      path: {{ $model.hostPath.path }}
      type: {{ $model.hostPath.type }}
{{- else if eq $model.source "image" }}
  - name: model
    emptyDir:
      sizeLimit: {{ $model.image.sizeLimit }}
{{- end }}
{{- end -}}

{{/* Volume mounts of a Tandem container; call with (dict "root" $ "shm" bool). */}}
{{- define "tandem.volumeMounts" -}}
volumeMounts:
  - name: tmp
    mountPath: /tmp
{{- if .shm }}
  - name: dshm
    mountPath: /dev/shm
{{- end }}
{{- if ne .root.Values.model.source "bundled" }}
  - name: model
    mountPath: {{ .root.Values.model.mountPath }}
    readOnly: true
{{- end }}
{{- end -}}

{{/* Init container copying the model out of an image (model.source "image"). */}}
{{- define "tandem.modelInitContainers" -}}
{{- $model := .Values.model -}}
{{- if eq $model.source "image" }}
initContainers:
  - name: model-copy
    image: {{ printf "%s:%s" $model.image.repository $model.image.tag }}
    imagePullPolicy: {{ $model.image.pullPolicy }}
    command: ["sh", "-c", {{ printf "cp -R %s/. %s/" (trimSuffix "/" $model.image.path) (trimSuffix "/" $model.mountPath) | quote }}]
    {{- include "tandem.containerSecurityContext" . | trim | nindent 4 }}
    {{- with $model.image.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: model
        mountPath: {{ $model.mountPath }}
{{- end }}
{{- end -}}

{{/* Components with a Deployment, as a comma-separated list (split it with splitList). */}}
{{- define "tandem.components" -}}
{{- if eq .Values.mode "pair" -}}
router,pair
{{- else -}}
router,prefill,decode
{{- end -}}
{{- end -}}
