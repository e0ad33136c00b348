{{/* Pull an oci:// ModelPack model into the pod's store, verify its signature against the trust policy,
     and link it at <mountPath>/model. Any failure fails the pod before the engine starts (fail closed). */}}
{{- define "inferstack.modelInitContainer" -}}
{{- $m := .Values.modelArtifacts }}
{{- $t := $m.trust }}
{{- $verify := and $t.requireSignature (not $t.allowUnverified) }}
{{- if and $verify (not $t.publicKeys) (not $t.certChains) }}
{{- fail "modelArtifacts.trust: an oci:// model needs publicKeys or certChains to verify its signature (fail closed); set trust.allowUnverified=true to serve it unverified" }}
{{- end }}
- name: model-pull
  image: {{ include "inferstack.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [/bin/sh, -c]
  args:
    - |
      set -eu
      out="$(inferstack model pull "$MODEL_REF" --store "$INFERSTACK_MODEL_STORE"{{ if $m.plainHTTP }} --plain-http{{ end }})"
      printf '%s\n' "$out"
      path="$(printf '%s\n' "$out" | sed -n 's/^  model files: //p')"
      [ -n "$path" ] || { echo "inferstack model pull printed no model path" >&2; exit 1; }
      {{- if $verify }}
      inferstack model verify "$path"
      {{- range $name, $_ := $t.publicKeys }} --public-key /etc/inferstack/trust/{{ $name }}{{ end }}
      {{- range $name, $_ := $t.certChains }} --cert-chain /etc/inferstack/trust/{{ $name }}{{ end }}
      {{- if $t.allowUnsignedFiles }} --allow-unsigned-files{{ end }}
      {{- end }}
      ln -sfn "$path" {{ $m.mountPath }}/model
  env:
    - name: MODEL_REF
      value: {{ include "inferstack.ociRef" . | quote }}
    - name: INFERSTACK_MODEL_STORE
      value: {{ $m.mountPath }}/store
    {{- if $m.registrySecret }}
    - name: INFERSTACK_REGISTRY_USERNAME
      valueFrom: {secretKeyRef: {name: {{ $m.registrySecret }}, key: username}}
    - name: INFERSTACK_REGISTRY_PASSWORD
      valueFrom: {secretKeyRef: {name: {{ $m.registrySecret }}, key: password}}
    {{- end }}
  volumeMounts:
    - {name: model, mountPath: {{ $m.mountPath }}}
    - {name: trust, mountPath: /etc/inferstack/trust, readOnly: true}
{{- end }}
