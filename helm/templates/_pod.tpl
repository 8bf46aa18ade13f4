{{/* Pod pieces the training workloads (Job, PyTorchJob, TrainingRuntime/TrainJob), TensorBoard and the push share. */}}

{{- define "ddpm.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "ddpm.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/*
Who the pod is, for the trainer's logs and run records (downward API), and which workload it belongs to.
Never DDPM_*: the trainer reads those as TrainingConfig fields and rejects unknown ones.
*/}}
{{- define "ddpm.identityEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_UID
  valueFrom:
    fieldRef:
      fieldPath: metadata.uid
- name: TRAINING_WORKLOAD
  value: {{ include "ddpm.workload" . | quote }}
{{- end }}

{{/* Env of every trainer/push container: the config file, the HF cache on the volume, HOME, extraEnv. */}}
{{- define "ddpm.commonEnv" -}}
- name: DDPM_CONFIG_FILE
  value: /etc/ddpm/config.yaml
- name: HF_HOME
  value: {{ include "ddpm.hfHome" . | quote }}
- name: HOME
  value: {{ include "ddpm.home" . | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
torchrun's c10d rendezvous, read by `ddpm launch` from torchrun's own PET_* names: every node joins the store on
node 0 (whose `ddpm launch` adds is_host=true from JOB_COMPLETION_INDEX 0), so a replaced pod rejoins and the
others restart their workers from the newest checkpoint instead of failing. The `job` and `jobset` backends also give
the run's shape ("MIN:MAX" nodes when elastic); TrainJob's torch plugin injects PET_NNODES/PET_NPROC_PER_NODE itself and forbids setting them
(kubeflow/trainer release-2.3 pkg/constants/constants.go TorchRunReservedEnvNames).
*/}}
{{- define "ddpm.rendezvousEnv" -}}
{{- $root := .root }}
{{- if has $root.Values.backend (list "job" "jobset") }}
- name: PET_NNODES
  value: {{ include "ddpm.nnodes" $root | quote }}
- name: PET_NPROC_PER_NODE
  value: {{ include "ddpm.procsPerNode" $root | quote }}
{{- end }}
- name: PET_RDZV_BACKEND
  value: c10d
- name: PET_RDZV_ENDPOINT
  value: {{ include "ddpm.rendezvousEndpoint" $root | quote }}
- name: PET_RDZV_ID
  value: {{ include "ddpm.rendezvousId" $root | quote }}
- name: PET_MAX_RESTARTS
  value: {{ int64 $root.Values.maxRestarts | toString | quote }}
- name: PET_RDZV_CONF
  value: {{ include "ddpm.rdzvConf" . | quote }}
{{- end }}

{{/*
The Kubernetes API token, for the containers that call the API (trainer/kube.py): the training container (rank 0
posts Events) and the push's wait-for-training. Every pod has automountServiceAccountToken: false, so no other
container (TensorBoard, the push upload, user init containers) gets a token. The volume is what the kubelet mounts
for automountServiceAccountToken: true (Kubernetes docs "Managing Service Accounts", bound service account token
volume; plugin/pkg/admission/serviceaccount/admission.go TokenVolumeSource): a projected bound token (expirationSeconds
3607, refreshed by the kubelet and re-read by the client), the cluster CA from the kube-root-ca.crt ConfigMap the
root-ca-cert-publisher puts in every namespace, and the namespace from the downward API. K8S_SERVICE_ACCOUNT_DIR
tells trainer/kube.py where it is.
*/}}
{{- define "ddpm.apiAccessPath" -}}/var/run/secrets/ddpm-trainer/kube-api{{- end }}

{{- define "ddpm.apiAccessVolume" -}}
- name: kube-api-access
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end }}

{{- define "ddpm.apiAccessMount" -}}
- name: kube-api-access
  mountPath: {{ include "ddpm.apiAccessPath" . }}
  readOnly: true
{{- end }}

{{- define "ddpm.apiAccessEnv" -}}
- name: K8S_SERVICE_ACCOUNT_DIR
  value: {{ include "ddpm.apiAccessPath" . | quote }}
{{- end }}

{{/* The c10d store's port on the training container (served by node 0). */}}
{{- define "ddpm.rendezvousPort" -}}
- name: rendezvous
  containerPort: {{ int .Values.masterPort }}
  protocol: TCP
{{- end }}

{{/* Volumes of the training pods: the shared volume, the config, /dev/shm, writable /tmp and HOME, the API token. */}}
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
    sizeLimit: {{ include "ddpm.shmSize" . }}
{{ include "ddpm.scratchVolumes" . }}
{{ include "ddpm.apiAccessVolume" . }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "ddpm.trainVolumeMounts" -}}
- name: data
  mountPath: /data
- name: config
  mountPath: /etc/ddpm
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{ include "ddpm.scratchMounts" . }}
{{ include "ddpm.apiAccessMount" . }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The only writable places besides the volume when the root filesystem is read-only. */}}
{{- define "ddpm.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end }}

{{- define "ddpm.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: {{ include "ddpm.home" . }}
{{- end }}

{{/*
storage.fixOwnership: the one container that is not "restricted". Root with CHOWN (chown), FOWNER and DAC_OVERRIDE
(to enter and fix folders another uid left); it creates this release's folders and gives what is not already the
runtime user's to it. Only for volumes whose CSI driver does not apply fsGroup (docs/KUBERNETES.md "Storage").
*/}}
{{- define "ddpm.fixOwnershipContainer" -}}
{{- $uid := .Values.podSecurityContext.runAsUser | default 1000 | int }}
{{- $gid := .Values.podSecurityContext.runAsGroup | default $uid | int }}
- name: fix-ownership
  image: {{ include "ddpm.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - sh
    - -c
    - |
      set -eu
      for dir in "$@"; do
        mkdir -p "$dir"
        find "$dir" \( ! -user {{ $uid }} -o ! -group {{ $gid }} \) -exec chown {{ $uid }}:{{ $gid }} {} +
      done
    - fix-ownership
    - {{ include "ddpm.dataPath" . }}
    {{- if not (hasPrefix (printf "%s/" (include "ddpm.dataPath" .)) (include "ddpm.outputDir" .)) }}
    - {{ include "ddpm.outputDir" . }}
    {{- end }}
    {{- if not (hasPrefix (printf "%s/" (include "ddpm.dataPath" .)) (include "ddpm.dataCacheDir" .)) }}
    - {{ include "ddpm.dataCacheDir" . }}
    {{- end }}
  resources:
    requests:
      cpu: 100m
      memory: 64Mi
    limits:
      memory: 256Mi
  securityContext:
    runAsUser: 0
    runAsGroup: 0
    runAsNonRoot: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
      add: ["CHOWN", "FOWNER", "DAC_OVERRIDE"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: data
      mountPath: /data
{{- end }}

{{/*
TensorBoard as a native sidecar of the training pods (an init container with restartPolicy Always; Kubernetes >= 1.29):
it starts with the pod, reads the volume where the trainer mounts it, and is stopped when the trainer's container
ends, so it never holds a ReadWriteOnce volume on another node or keeps a GPU node (whose taint it need not
tolerate) up after training. Every training pod runs one; the Service shows rank 0's.
*/}}
{{- define "ddpm.tensorboardContainer" -}}
{{- $root := .root -}}
- name: tensorboard
  {{- with $root.Values.tensorboard.image }}
  image: {{ if .repository }}{{ printf "%s:%s" .repository (.tag | default $root.Chart.AppVersion) }}{{ else }}{{ include "ddpm.image" $root }}{{ end }}
  {{- end }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  {{- if .sidecar }}
  restartPolicy: Always
  {{- end }}
  command:
    - tensorboard
    - --logdir
    - {{ printf "%s/logs" (include "ddpm.outputDir" $root) | quote }}
    - --host
    - 0.0.0.0
    - --port
    - "6006"
  env:
    - name: HOME
      value: {{ include "ddpm.home" $root | quote }}
  ports:
    - name: tensorboard
      containerPort: 6006
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /
      port: 6006
    periodSeconds: 10
  {{- /* a hung TensorBoard is restarted (a sidecar too: restartPolicy Always), never the trainer */}}
  livenessProbe:
    httpGet:
      path: /
      port: 6006
    initialDelaySeconds: 60
    periodSeconds: 30
    failureThreshold: 5
  resources:
    {{- toYaml $root.Values.tensorboard.resources | nindent 4 }}
  securityContext:
    {{- include "ddpm.containerSecurityContext" $root | nindent 4 }}
  volumeMounts:
    - name: data
      mountPath: /data
      readOnly: true
    {{- include "ddpm.scratchMounts" $root | nindent 4 }}
{{- end }}

{{- define "ddpm.trainInitContainers" -}}
{{- if .Values.storage.fixOwnership }}
{{ include "ddpm.fixOwnershipContainer" . }}
{{- end }}
{{- with .Values.initContainers }}
{{ toYaml . }}
{{- end }}
{{- if include "ddpm.tensorboardSidecar" . }}
{{ include "ddpm.tensorboardContainer" (dict "root" . "sidecar" true) }}
{{- end }}
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

{{/*
The training pod spec of the `job`, `jobset` and `pytorchjob` backends and of the chart's TrainingRuntime. Call with
(dict "root" $ "container" NAME "restartPolicy" POLICY-or-"" "env" YAML "ports" YAML "subdomain" NAME
"readinessProbe" YAML-or-"").
*/}}
{{- define "ddpm.trainPodSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- with .restartPolicy }}
restartPolicy: {{ . }}
{{- end }}
{{- /* No Service env vars: a Service named <release>-* (this release's TensorBoard, for release `ddpm`) would inject
DDPM_*_SERVICE_HOST/_PORT variables, which the trainer would have to tell apart from config. */}}
enableServiceLinks: false
serviceAccountName: {{ include "ddpm.serviceAccountName" $root }}
# Only the trainer container gets an API token (ddpm.apiAccessVolume).
automountServiceAccountToken: false
terminationGracePeriodSeconds: {{ int64 $v.terminationGracePeriodSeconds }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .subdomain }}
subdomain: {{ . }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "ddpm.podSecurityContext" $root | nindent 2 }}
{{- with (include "ddpm.trainInitContainers" $root | trim) }}
initContainers:
  {{- . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .container }}
    image: {{ include "ddpm.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    command: ["ddpm", "launch"]
    {{- with .env }}
    env:
      {{- . | nindent 6 }}
    {{- end }}
    {{- with $v.envFrom }}
    envFrom:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .ports }}
    ports:
      {{- . | nindent 6 }}
    {{- end }}
    {{- with .readinessProbe }}
    readinessProbe:
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

{{/*
The training container's env for the Job, JobSet and PyTorchJob (the TrainJob passes the same through
spec.trainer.env): ddpm.trainEnvFor with (dict "root" $ "isHost" "true"/"false"/"") where a backend must say which
node hosts the rendezvous store, ddpm.trainEnv where `ddpm launch` can tell from JOB_COMPLETION_INDEX. With
push.mode=trainer, rank 0 pushes at the end of training: HF_TOKEN from the Secret.
*/}}
{{- define "ddpm.trainEnvFor" -}}
{{- $root := .root }}
{{- if ne $root.Values.backend "pytorchjob" }}
{{ include "ddpm.rendezvousEnv" . }}
{{- end }}
{{ include "ddpm.identityEnv" $root }}
{{ include "ddpm.apiAccessEnv" $root }}
{{ include "ddpm.commonEnv" $root }}
{{- if include "ddpm.pushByTrainer" $root }}
{{ include "ddpm.tokenEnv" $root }}
{{- end }}
{{- end }}

{{- define "ddpm.trainEnv" -}}{{ include "ddpm.trainEnvFor" (dict "root" . "isHost" "") }}{{- end }}

{{/*
Scheduling of the pods that are not training pods (the TensorBoard Deployment, the push Job, the test pod): their
own nodeSelector, tolerations and affinity, none by default (they need no GPU, so they stay off tainted GPU nodes and
never keep one up), and the global imagePullSecrets unless they set their own. Call with (dict "root" $ "own"
.Values.<component>).
*/}}
{{- define "ddpm.componentScheduling" -}}
{{- $v := .root.Values }}
{{- $own := .own }}
{{- $pullSecrets := $v.imagePullSecrets }}
{{- if not (kindIs "invalid" $own.imagePullSecrets) }}{{ $pullSecrets = $own.imagePullSecrets }}{{ end }}
{{- with $pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $own.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $own.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $own.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The Job podFailurePolicy, for the `job` backend, the JobSet's Job and the TrainingRuntime's Job: the trainer's exit
codes decide. Kubernetes applies the first matching rule (pkg/controller/job/pod_failure_policy.go
matchPodFailurePolicy); a pod no rule matches counts against backoffLimit. Call with (dict "container" NAME
"preemption" ACTION): Ignore (default) replaces a preempted pod without counting it; FailJob (the non-elastic JobSet)
fails the Job with a message that names the exit code or condition, for the JobSet's failurePolicy to restart the gang.
*/}}
{{- define "ddpm.podFailurePolicy" -}}
{{- $preemption := .preemption | default "Ignore" -}}
{{- $then := ternary "replaced, resumes, not counted" "the JobSet recreates the gang, not counted" (eq $preemption "Ignore") -}}
rules:
  # 2: bad configuration or input, 3: training diverged. Retrying cannot help: the Job fails at once.
  - action: FailJob
    onExitCodes:
      containerName: {{ .container }}
      operator: In
      values: [2, 3]
  # 143: preempted (SIGTERM), checkpoint written; {{ $then }}.
  - action: {{ $preemption }}
    onExitCodes:
      containerName: {{ .container }}
      operator: In
      values: [143]
  # Evicted, preempted or drained by Kubernetes: {{ $then }}.
  - action: {{ $preemption }}
    onPodConditions:
      - type: DisruptionTarget
        status: "True"
{{- end }}

{{/*
Elastic runs: the Job is complete once pod 0 (rank 0, which hosts the rendezvous and writes the completion marker)
has succeeded, and its other pods are then removed (Job successPolicy, KEP-3998: beta and on by default from 1.31,
GA in 1.33; API reference: "Once any of the rules are met, the SuccessCriteriaMet condition is added, and the
lingering pods are removed"). Without it, a pod that was still pending when training ended would start, find no
rendezvous and fail, and the Job with it.
*/}}
{{- define "ddpm.elasticSuccessPolicy" -}}
successPolicy:
  rules:
    - succeededIndexes: "0"
{{- end }}

{{/* The Hub token, only ever from the existing Secret. */}}
{{- define "ddpm.tokenEnv" -}}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.push.tokenSecret }}
      key: {{ .Values.push.tokenSecretKey }}
{{- end }}

{{/*
The push pod (push.mode=job): `ddpm wait-for-training` (init container, with an API token) follows the training
workload until this config's run is complete, then `ddpm push`. Call with (dict "root" $ "apiAccess" true).
*/}}
{{- define "ddpm.pushPodSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
restartPolicy: Never
# No Service env vars: DDPM_<SERVICE>_* would look like config to the trainer.
enableServiceLinks: false
serviceAccountName: {{ include "ddpm.pushServiceAccountName" $root }}
# Only the wait gets an API token (ddpm.apiAccessVolume), never the upload.
automountServiceAccountToken: false
{{- with (include "ddpm.componentScheduling" (dict "root" $root "own" $v.push) | trim) }}
{{ . }}
{{- end }}
securityContext:
  {{- include "ddpm.podSecurityContext" $root | nindent 2 }}
initContainers:
  - name: wait-for-training
    image: {{ include "ddpm.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    command:
      - ddpm
      - wait-for-training
      - --workload
      - {{ include "ddpm.workload" $root }}
      - --poll-seconds
      - {{ int64 $v.push.pollSeconds | toString | quote }}
      - --timeout-seconds
      - {{ int64 $v.push.waitTimeoutSeconds | toString | quote }}
    env:
      {{- include "ddpm.identityEnv" $root | nindent 6 }}
      {{- if .apiAccess }}
      {{- include "ddpm.apiAccessEnv" $root | nindent 6 }}
      {{- end }}
      {{- include "ddpm.commonEnv" $root | nindent 6 }}
      {{- include "ddpm.tokenEnv" $root | nindent 6 }}
    resources:
      requests:
        cpu: 50m
        memory: 256Mi
      limits:
        memory: 1Gi
    securityContext:
      {{- include "ddpm.containerSecurityContext" $root | nindent 6 }}
    volumeMounts:
      - name: data
        mountPath: /data
        readOnly: true
      - name: config
        mountPath: /etc/ddpm
        readOnly: true
      {{- include "ddpm.scratchMounts" $root | nindent 6 }}
      {{- if .apiAccess }}
      {{- include "ddpm.apiAccessMount" $root | nindent 6 }}
      {{- end }}
containers:
  - name: push
    image: {{ include "ddpm.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    command: ["ddpm", "push", "--deadline-seconds", {{ int64 $v.push.deadlineSeconds | toString | quote }}]
    env:
      {{- include "ddpm.identityEnv" $root | nindent 6 }}
      {{- include "ddpm.commonEnv" $root | nindent 6 }}
      {{- include "ddpm.tokenEnv" $root | nindent 6 }}
    resources:
      {{- toYaml $v.push.resources | nindent 6 }}
    securityContext:
      {{- include "ddpm.containerSecurityContext" $root | nindent 6 }}
    volumeMounts:
      - name: data
        mountPath: /data
      - name: config
        mountPath: /etc/ddpm
        readOnly: true
      {{- include "ddpm.scratchMounts" $root | nindent 6 }}
volumes:
  - name: data
    persistentVolumeClaim:
      claimName: {{ include "ddpm.claimName" $root }}
  - name: config
    configMap:
      name: {{ include "ddpm.configName" $root }}
  {{- include "ddpm.scratchVolumes" $root | nindent 2 }}
  {{- if .apiAccess }}
  {{- include "ddpm.apiAccessVolume" $root | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The push pod's labels. */}}
{{- define "ddpm.pushPodMetadata" -}}
labels:
  {{- include "ddpm.selectorLabels" . | nindent 2 }}
  app.kubernetes.io/component: push
{{- end }}

{{/* Deadline of the push Job: push.activeDeadlineSeconds, or the wait + the upload + 600 s. */}}
{{- define "ddpm.pushDeadline" -}}
{{- .Values.push.activeDeadlineSeconds | default (add .Values.push.waitTimeoutSeconds .Values.push.deadlineSeconds 600) | int64 }}
{{- end }}
