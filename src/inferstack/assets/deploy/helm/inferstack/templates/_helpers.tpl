{{/* Names */}}
{{- define "inferstack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inferstack.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "inferstack.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "inferstack.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "inferstack.eppName" -}}
{{- printf "%s-epp" (include "inferstack.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inferstack.poolName" -}}
{{- default (include "inferstack.fullname" .) .Values.inferencePool.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inferstack.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inferstack.eppName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The model name as a label value (<= 63 chars of [A-Za-z0-9._-], alphanumeric at both ends). */}}
{{- define "inferstack.modelLabel" -}}
{{- regexReplaceAll "[^A-Za-z0-9._-]" .Values.modelArtifacts.name "-" | trunc 63 | trimAll "-._" }}
{{- end }}

{{- define "inferstack.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "inferstack.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- if ne .Values.provider.name "none" }}
inferstack.io/provider: {{ .Values.provider.name }}
{{- end }}
{{- end }}

{{/* Labels every engine pod carries: the InferencePool's selector (llm-d's convention). */}}
{{- define "inferstack.poolSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
llm-d.ai/inferenceServing: "true"
llm-d.ai/model: {{ include "inferstack.modelLabel" . }}
{{- end }}

{{- define "inferstack.eppSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: endpoint-picker
{{- end }}

{{- define "inferstack.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "inferstack.engineImage" -}}
{{- $e := index .Values.engines .Values.engine.type }}
{{- default (include "inferstack.image" .) $e.image }}
{{- end }}

{{/* Model source: oci | pvc | hf | plain (anything else the engine takes as --model). */}}
{{- define "inferstack.modelScheme" -}}
{{- $uri := .Values.modelArtifacts.uri }}
{{- if hasPrefix "oci://" $uri }}oci{{- else if hasPrefix "pvc://" $uri }}pvc{{- else if hasPrefix "hf://" $uri }}hf{{- else }}plain{{- end }}
{{- end }}

{{/* oci:// reference after the trust policy's render-time rules (registry allowlist, pins, digests). */}}
{{- define "inferstack.ociRef" -}}
{{- $t := .Values.modelArtifacts.trust }}
{{- $ref := trimPrefix "oci://" .Values.modelArtifacts.uri }}
{{- $registry := index (splitList "/" $ref) 0 }}
{{- if and $t.allowedRegistries (not (has $registry $t.allowedRegistries)) }}
{{- fail (printf "modelArtifacts.uri: registry %q is not in modelArtifacts.trust.allowedRegistries %v" $registry $t.allowedRegistries) }}
{{- end }}
{{- if and (not (contains "@sha256:" $ref)) (hasKey $t.pinnedDigests $ref) }}
{{- $ref = printf "%s@%s" (regexReplaceAll ":[^:/]+$" $ref "") (index $t.pinnedDigests $ref) }}
{{- end }}
{{- if and $t.requireDigest (not (contains "@sha256:" $ref)) }}
{{- fail (printf "modelArtifacts.uri: the trust policy requires a digest-pinned reference (oci://repo@sha256:... or trust.pinnedDigests), got %q" .Values.modelArtifacts.uri) }}
{{- end }}
{{- $ref }}
{{- end }}

{{/* True when engines load the model from the shared /models volume the init container or image fills. */}}
{{- define "inferstack.modelPath" -}}
{{- $scheme := include "inferstack.modelScheme" . }}
{{- $m := .Values.modelArtifacts }}
{{- if eq $scheme "oci" }}{{ $m.mountPath }}/model
{{- else if eq $scheme "pvc" }}{{ $m.mountPath }}/{{ join "/" (rest (splitList "/" (trimPrefix "pvc://" $m.uri))) }}
{{- else if eq $scheme "hf" }}
{{- if eq .Values.engine.type "inferstack" }}
{{- fail "modelArtifacts.uri: hf:// is for vLLM/SGLang (they download from the Hub); the inferstack engine takes oci://, pvc:// or a bundled alias" }}
{{- end }}
{{- trimPrefix "hf://" $m.uri }}
{{- else }}{{ $m.uri }}
{{- end }}
{{- end }}

{{/* Is the init container (pull + verify) in use? */}}
{{- define "inferstack.useInit" -}}
{{- if and (eq (include "inferstack.modelScheme" .) "oci") (eq .Values.modelArtifacts.source "initContainer") }}true{{ end }}
{{- end }}

{{/* The engine's command-line args for one role (dict: root, role (prefill|decode), spec). */}}
{{- define "inferstack.engineArgs" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $type := $v.engine.type }}
{{- $e := index $v.engines $type }}
{{- $pd := gt (int $v.prefill.replicas) 0 }}
{{- $tp := int (default 1 .spec.parallelism.tensor) }}
{{- $model := include "inferstack.modelPath" $root }}
{{- $port := toString $v.engine.port }}
{{- if eq $type "inferstack" }}
{{- if $e.emulate }}
- --emulate
- {{ $e.emulate | quote }}
{{- else }}
- --model
- {{ $model | quote }}
{{- end }}
- --served-model-name
- {{ $v.modelArtifacts.name | quote }}
- --host
- 0.0.0.0
- --port
- {{ $port | quote }}
- --drain-timeout
- {{ toString $v.engine.drainSeconds | quote }}
- --role
- {{ if $pd }}{{ .role }}{{ else }}both{{ end }}
{{- if and $pd (eq .role "prefill") }}
- --kv-transfer-port
- {{ toString $e.kvTransferPort | quote }}
{{- end }}
{{- if and (or $pd $e.kvReuse) $e.kvTransport }}
- --kv-transport
- {{ $e.kvTransport | quote }}
{{- end }}
{{- if include "inferstack.kvReuse" $root }}
- --kv-reuse
- --kv-transfer-port
- {{ toString $e.kvTransferPort | quote }}
- --kv-events-endpoint
- {{ printf "tcp://*:%d" (int $e.kvEventsPort) | quote }}
{{- end }}
{{- if and (eq $v.accelerator.type "nvidia") (not $e.emulate) }}
- --device
- cuda
{{- end }}
{{- else if eq $type "vllm" }}
- {{ $model | quote }}
- --served-model-name
- {{ $v.modelArtifacts.name | quote }}
- --host
- 0.0.0.0
- --port
- {{ $port | quote }}
- --tensor-parallel-size
- {{ toString $tp | quote }}
{{- if $pd }}
- --kv-transfer-config
- {{ $e.kvTransferConfig | quote }}
{{- end }}
{{- else }}{{/* sglang */}}
- --model-path
- {{ $model | quote }}
- --served-model-name
- {{ $v.modelArtifacts.name | quote }}
- --host
- 0.0.0.0
- --port
- {{ $port | quote }}
- --tp
- {{ toString $tp | quote }}
- --enable-metrics
{{- if $pd }}
- --disaggregation-mode
- {{ .role }}
{{- end }}
{{- end }}
{{- range $v.engine.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- range .spec.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* "true" when the inferstack engines run cross-replica KV reuse (engines.inferstack.kvReuse); checks
what it needs. */}}
{{- define "inferstack.kvReuse" -}}
{{- $v := .Values }}
{{- if and (eq $v.engine.type "inferstack") $v.engines.inferstack.kvReuse }}
{{- if gt (int $v.prefill.replicas) 0 }}
{{- fail "engines.inferstack.kvReuse is for aggregated pods (prefill.replicas 0): a PD pool moves KV from prefill to decode pods already" }}
{{- end }}
{{- if not $v.engines.inferstack.kvTransferSecret }}
{{- fail "engines.inferstack.kvReuse needs engines.inferstack.kvTransferSecret: a Secret (key `secret`) shared by the engine pods and the picker" }}
{{- end }}
{{- if not (hasKey (default dict $v.inferenceExtension.poolConfig) "precise_prefix") }}
{{- fail "engines.inferstack.kvReuse needs inferenceExtension.poolConfig.precise_prefix (model_digest, dtype: the engines' KV key space) so the picker indexes their KV events" }}
{{- end }}
{{- print "true" }}
{{- end }}
{{- end }}

{{/* The KV transfer secret as a container env entry (cross-replica KV reuse). */}}
{{- define "inferstack.kvSecretEnv" -}}
- name: INFERSTACK_KV_TRANSFER_SECRET
  valueFrom:
    secretKeyRef: {name: {{ .Values.engines.inferstack.kvTransferSecret | quote }}, key: secret}
{{- end }}
