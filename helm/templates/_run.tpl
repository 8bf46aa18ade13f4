{{/* Values derived from the user's values: the run's shape, its paths, and the pod pieces every backend shares. */}}

{{/* Training pods (nodes): 1 up to gpusPerNode GPUs, else gpus / gpusPerNode. */}}
{{- define "ddpm.nodes" -}}
{{- if gt (int .Values.gpus) (int .Values.gpusPerNode) }}{{ div (int .Values.gpus) (int .Values.gpusPerNode) }}{{ else }}1{{ end }}
{{- end }}

{{/* Processes (and GPUs) per training pod. */}}
{{- define "ddpm.procsPerNode" -}}
{{- if gt (int .Values.gpus) (int .Values.gpusPerNode) }}{{ int .Values.gpusPerNode }}{{ else }}{{ int .Values.gpus }}{{ end }}
{{- end }}

{{- define "ddpm.dataPath" -}}/data/{{ include "ddpm.fullname" . }}{{- end }}
{{- define "ddpm.outputDir" -}}{{ .Values.config.output_dir | default (printf "%s/output" (include "ddpm.dataPath" .)) }}{{- end }}
{{- define "ddpm.hfHome" -}}{{ include "ddpm.dataPath" . }}/hf-cache{{- end }}
{{- define "ddpm.completionMarker" -}}{{ include "ddpm.outputDir" . }}/training_complete.json{{- end }}

{{/* The trainer's config file: .Values.config with output_dir and the decoded-data cache on this release's
folder (the cache outlives a run, so a re-install with the same images skips decoding). */}}
{{- define "ddpm.configYaml" -}}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config "output_dir" (include "ddpm.outputDir" .) }}
{{- $_ := set $config "data_cache_dir" (.Values.config.data_cache_dir | default (printf "%s/data-cache" (include "ddpm.dataPath" .))) }}
{{- toYaml $config }}
{{- end }}

{{/* The "restricted" Pod Security profile, pod and container level. */}}
{{- define "ddpm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "ddpm.containerSecurityContext" -}}
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Env of every trainer/push container: the config file, the HF cache on the volume, extraEnv. */}}
{{- define "ddpm.commonEnv" -}}
- name: DDPM_CONFIG_FILE
  value: /etc/ddpm/config.yaml
- name: HF_HOME
  value: {{ include "ddpm.hfHome" . | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The GPU limit merged into the user's resources. */}}
{{- define "ddpm.trainResources" -}}
{{- $resources := deepCopy .Values.resources }}
{{- $limits := get $resources "limits" | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" (include "ddpm.procsPerNode" . | int) }}
{{- $_ := set $resources "limits" $limits }}
{{- toYaml $resources }}
{{- end }}

{{- define "ddpm.volumes" -}}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "ddpm.claimName" . }}
- name: config
  configMap:
    name: {{ include "ddpm.configName" . }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
{{- end }}

{{- define "ddpm.trainVolumeMounts" -}}
- name: data
  mountPath: /data
- name: config
  mountPath: /etc/ddpm
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/* Scheduling shared by the training pods (and, except the priority, TensorBoard and the push). */}}
{{- define "ddpm.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "ddpm.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The training pod spec for the `job` and `pytorchjob` backends. Call with (dict "root" $ "container" NAME
"restartPolicy" POLICY "env" EXTRA_ENV_YAML).
*/}}
{{- define "ddpm.trainPodSpec" -}}
{{- $root := .root -}}
restartPolicy: {{ .restartPolicy }}
{{- /* No Service env vars: a Service named <release>-* (this release's TensorBoard, for release `ddpm`) would inject
DDPM_*_SERVICE_HOST/_PORT variables, which the trainer reads as config and rejects. */}}
enableServiceLinks: false
terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
{{- with $root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- include "ddpm.imagePullSecrets" $root }}
{{- include "ddpm.scheduling" $root }}
securityContext:
  {{- include "ddpm.podSecurityContext" $root | nindent 2 }}
{{- with .podExtra }}
{{ . }}
{{- end }}
containers:
  - name: {{ .container }}
    image: {{ include "ddpm.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command: ["ddpm", "launch"]
    env:
      {{- with .env }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- include "ddpm.commonEnv" $root | nindent 6 }}
    {{- with .ports }}
    ports:
      {{- . | nindent 6 }}
    {{- end }}
    resources:
      {{- include "ddpm.trainResources" $root | nindent 6 }}
    securityContext:
      {{- include "ddpm.containerSecurityContext" $root | nindent 6 }}
    volumeMounts:
      {{- include "ddpm.trainVolumeMounts" $root | nindent 6 }}
volumes:
  {{- include "ddpm.volumes" $root | nindent 2 }}
{{- end }}

{{- define "ddpm.trainPodMetadata" -}}
labels:
  {{- include "ddpm.selectorLabels" . | nindent 2 }}
  app.kubernetes.io/component: train
  {{- with .Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
