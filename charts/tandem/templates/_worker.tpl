{{/*
One prefill or decode worker container. Call with a dict:
  root: $; role: "prefill" | "decode"; name: container name; pool: the pod's pool values
  (probes, preStop, extraArgs, extraEnv); device: "" (engine.device) or a device;
  gpus; resources; claim: "" or the name of a shared GPU claim; shm: bool;
  workerId: the --worker-id (may use $(POD_NAME)); portNames: map of grpc/metrics/transfer
  port names.
Engine settings come from the ConfigMap (envFrom) and are expanded by Kubernetes
from $(VAR) in the arguments.
*/}}
{{- define "tandem.workerContainer" -}}
{{- $root := .root -}}
{{- $ports := ternary $root.Values.prefill.ports $root.Values.decode.ports (eq .role "prefill") -}}
- name: {{ .name }}
  image: {{ include "tandem.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["tandem"]
  args:
    - {{ .role }}
    - --model=$(TANDEM_MODEL)
    {{- if $root.Values.model.maxModelLen }}
    - --max-model-len=$(TANDEM_MAX_MODEL_LEN)
    {{- end }}
    - --device={{ .device | default "$(TANDEM_DEVICE)" }}
    - --dtype=$(TANDEM_DTYPE)
    - --block-size=$(TANDEM_BLOCK_SIZE)
    {{- if $root.Values.engine.numKvBlocks }}
    - --num-kv-blocks=$(TANDEM_NUM_KV_BLOCKS)
    {{- else }}
    - --kv-cache-memory-gb=$(TANDEM_KV_CACHE_MEMORY_GB)
    {{- end }}
    {{- if eq $root.Values.network.addressMode "advertise" }}
    - --host=0.0.0.0
    - --advertise-host=$(POD_IP)
    {{- else }}
    - --host=$(POD_IP)
    {{- end }}
    - --port={{ $ports.grpc }}
    - --metrics-port={{ $ports.metrics }}
    {{- if eq .role "decode" }}
    - --transfer-port={{ $ports.transfer }}
    {{- end }}
    - --redis-url=$(TANDEM_REDIS_URL)
    - --redis-prefix=$(TANDEM_REDIS_PREFIX)
    - --worker-id={{ .workerId }}
    - --kv-transport=$(TANDEM_KV_TRANSPORT)
    - --lease-ms=$(TANDEM_LEASE_MS)
    - --max-num-seqs=$(TANDEM_MAX_NUM_SEQS)
    - --max-num-batched-tokens=$(TANDEM_MAX_NUM_BATCHED_TOKENS)
    - --max-queue-len=$(TANDEM_MAX_QUEUE_LEN)
    - --seed=$(TANDEM_SEED)
    {{- range .pool.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  envFrom:
    - configMapRef:
        name: {{ include "tandem.fullname" $root }}-config
  env:
    {{- include "tandem.env" (dict "root" $root "role" .role) | trim | nindent 4 }}
    {{- with .pool.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: {{ .portNames.grpc }}
      containerPort: {{ $ports.grpc }}
      protocol: TCP
    - name: {{ .portNames.metrics }}
      containerPort: {{ $ports.metrics }}
      protocol: TCP
    {{- if eq .role "decode" }}
    - name: {{ .portNames.transfer }}
      containerPort: {{ $ports.transfer }}
      protocol: TCP
    {{- end }}
  {{- include "tandem.grpcProbes" (dict "port" $ports.grpc "probes" .pool.probes) | trim | nindent 2 }}
  {{- with (include "tandem.lifecycle" .pool | trim) }}{{- . | nindent 2 }}{{- end }}
  {{- include "tandem.gpuResources" (dict "resources" .resources "gpus" .gpus "claim" .claim) | trim | nindent 2 }}
  {{- include "tandem.containerSecurityContext" $root | trim | nindent 2 }}
  {{- include "tandem.volumeMounts" (dict "root" $root "shm" .shm) | trim | nindent 2 }}
{{- end -}}

{{/*
Deployment of worker pods; call with (dict "root" $ "component" "prefill" "pool" map
"containers" string "roles" (dict "prefill" bool "decode" bool) "metricsPort" N "extraPodSpec" string).
*/}}
{{- define "tandem.workerDeployment" -}}
{{- $root := .root -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tandem.fullname" $root }}-{{ .component }}
  labels:
    {{- include "tandem.componentLabels" (dict "root" $root "component" .component) | nindent 4 }}
spec:
  {{- if not .pool.autoscaling.enabled }}
  replicas: {{ .pool.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 0
      maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "tandem.selectorLabels" (dict "root" $root "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "tandem.componentLabels" (dict "root" $root "component" .component) | nindent 8 }}
        {{- include "tandem.roleLabels" .roles | nindent 8 }}
        {{- with .pool.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "tandem.podAnnotations" (dict "root" $root "pool" .pool "port" .metricsPort) | trim | nindent 8 }}
    spec:
      {{- include "tandem.podCommon" $root | trim | nindent 6 }}
      terminationGracePeriodSeconds: {{ .pool.terminationGracePeriodSeconds }}
      {{- with .extraPodSpec }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- with (include "tandem.scheduling" (dict "root" $root "pool" .pool "component" .component) | trim) }}{{- . | nindent 6 }}{{- end }}
      {{- with (include "tandem.modelInitContainers" $root | trim) }}{{- . | nindent 6 }}{{- end }}
      containers:
        {{- .containers | nindent 8 }}
      {{- include "tandem.volumes" (dict "root" $root "shmSize" .pool.shmSize) | trim | nindent 6 }}
{{- end -}}
