{{/* Values derived from the user's values: the run's shape, its paths, sizes and retry budget. */}}

{{/* Training pods (nodes): 1 up to gpusPerNode GPUs, else gpus / gpusPerNode. */}}
{{- define "ddpm.nodes" -}}
{{- if gt (int .Values.gpus) (int .Values.gpusPerNode) }}{{ div (int .Values.gpus) (int .Values.gpusPerNode) }}{{ else }}1{{ end }}
{{- end }}

{{/* Processes (and GPUs) per training pod. */}}
{{- define "ddpm.procsPerNode" -}}
{{- if gt (int .Values.gpus) (int .Values.gpusPerNode) }}{{ int .Values.gpusPerNode }}{{ else }}{{ int .Values.gpus }}{{ end }}
{{- end }}

{{/* Fewest nodes the run trains on: elastic.minNodes when elastic, else all of them. */}}
{{- define "ddpm.minNodes" -}}
{{- if .Values.elastic.enabled }}{{ int .Values.elastic.minNodes }}{{ else }}{{ include "ddpm.nodes" . }}{{ end }}
{{- end }}

{{/* torchrun's --nnodes (PET_NNODES): "N", or "MIN:MAX" when elastic. */}}
{{- define "ddpm.nnodes" -}}
{{- $min := include "ddpm.minNodes" . }}{{ $max := include "ddpm.nodes" . }}
{{- if eq $min $max }}{{ $max }}{{ else }}{{ $min }}:{{ $max }}{{ end }}
{{- end }}

{{/*
The trainer's defaults for the fields the chart computes with (trainer/config.py TrainingConfig; tests/test_chart_render.py
checks they match).
*/}}
{{- define "ddpm.trainBatchSize" -}}{{ .Values.config.train_batch_size | default 16 | int }}{{- end }}
{{- define "ddpm.gradientAccumulation" -}}{{ .Values.config.gradient_accumulation_steps | default 1 | int }}{{- end }}

{{/*
Images per optimizer update over all processes (config.global_batch_size): the user's, or with elastic on
train_batch_size x gradient_accumulation_steps x maxNodes x procsPerNode, the batch of the full-size run, which the
trainer then keeps at every size by recomputing the accumulation; empty when neither.
*/}}
{{- define "ddpm.globalBatchSize" -}}
{{- if not (kindIs "invalid" .Values.config.global_batch_size) }}{{ int64 .Values.config.global_batch_size }}
{{- else if .Values.elastic.enabled }}
{{- mul (include "ddpm.trainBatchSize" . | int) (include "ddpm.gradientAccumulation" . | int) (include "ddpm.nodes" . | int) (include "ddpm.procsPerNode" . | int) }}
{{- end }}
{{- end }}

{{- define "ddpm.dataPath" -}}/data/{{ include "ddpm.fullname" . }}{{- end }}
{{- define "ddpm.outputDir" -}}{{ .Values.config.output_dir | default (printf "%s/output" (include "ddpm.dataPath" .)) }}{{- end }}
{{- define "ddpm.dataCacheDir" -}}{{ .Values.config.data_cache_dir | default (printf "%s/data-cache" (include "ddpm.dataPath" .)) }}{{- end }}
{{- define "ddpm.hfHome" -}}{{ include "ddpm.dataPath" . }}/hf-cache{{- end }}
{{- define "ddpm.completionMarker" -}}{{ include "ddpm.outputDir" . }}/training_complete.json{{- end }}
{{/* HOME of every container: an emptyDir, since the root filesystem is read-only (the image's user's home). */}}
{{- define "ddpm.home" -}}/home/ddpm{{- end }}

{{/* The trainer's config file: .Values.config with output_dir and the decoded-data cache on this release's
folder (the cache outlives a run, so a re-install with the same images skips decoding), with elastic on the global
batch (ddpm.globalBatchSize), and with push.mode=trainer the push at the end of training (push_to_hub). */}}
{{- define "ddpm.configYaml" -}}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config "output_dir" (include "ddpm.outputDir" .) }}
{{- $_ := set $config "data_cache_dir" (include "ddpm.dataCacheDir" .) }}
{{- if include "ddpm.pushByTrainer" . }}{{ $_ := set $config "push_to_hub" true }}{{ end }}
{{- with include "ddpm.globalBatchSize" . }}{{ $_ := set $config "global_batch_size" (int64 .) }}{{ end }}
{{- toYaml $config }}
{{- end }}

{{/*
Failed pods the training workload survives: backoffLimit, or backoffLimitPerNode x nodes (a crash of every node at
once, a deterministic bug, costs one per node; preemptions and lost peers exit 143 and are never counted).
*/}}
{{- define "ddpm.backoffLimit" -}}
{{- if kindIs "invalid" .Values.backoffLimit }}{{ mul (int .Values.backoffLimitPerNode) (include "ddpm.nodes" . | int) }}
{{- else }}{{ int .Values.backoffLimit }}{{ end }}
{{- end }}

{{/*
Counted gang restarts of a JobSet (failurePolicy.maxRestarts): backoffLimit, or backoffLimitPerNode. Each restart
recreates every node at once, so the per-pod budget x nodes would let a deterministic crash restart the whole gang
6 x nodes times (192 at 256 GPUs).
*/}}
{{- define "ddpm.gangRestarts" -}}
{{- if kindIs "invalid" .Values.backoffLimit }}{{ int .Values.backoffLimitPerNode }}{{ else }}{{ int .Values.backoffLimit }}{{ end }}
{{- end }}

{{/*
torchrun's rendezvous settings (PET_RDZV_CONF): join_timeout, and read_timeout, the timeout of the c10d store's
connections (torch/distributed/elastic/rendezvous/c10d_rendezvous_backend.py, 60 s by default), so that a node whose
node 0 starts minutes later waits for it instead of failing. Call with (dict "root" $ "isHost" "true"/"false"/"").
*/}}
{{- define "ddpm.rdzvConf" -}}
{{- $t := int .root.Values.rendezvousTimeoutSeconds }}
{{- printf "join_timeout=%d,read_timeout=%d" $t $t }}{{ with .isHost }},is_host={{ . }}{{ end }}
{{- end }}

{{/* Whether the trainer's rank 0 pushes at the end of training (push.mode=trainer). */}}
{{- define "ddpm.pushByTrainer" -}}{{ if and .Values.push.enabled (eq .Values.push.mode "trainer") }}true{{ end }}{{- end }}
{{/* Whether a separate push Job runs (push.mode=job). */}}
{{- define "ddpm.pushJob" -}}{{ if and .Values.push.enabled (eq .Values.push.mode "job") }}true{{ end }}{{- end }}
{{/* Whether TensorBoard is a sidecar of the training pods. */}}
{{- define "ddpm.tensorboardSidecar" -}}{{ if and .Values.tensorboard.enabled (eq .Values.tensorboard.mode "sidecar") }}true{{ end }}{{- end }}

{{/* torchrun's rendezvous id: stable for the release, so a replaced pod joins the same rendezvous. */}}
{{- define "ddpm.rendezvousId" -}}{{ include "ddpm.fullname" . }}{{- end }}

{{/* The c10d rendezvous endpoint: node 0's stable DNS name, per backend. */}}
{{- define "ddpm.rendezvousEndpoint" -}}
{{- $train := include "ddpm.trainName" . }}
{{- if eq .Values.backend "job" }}{{ printf "%s-0.%s:%d" $train (include "ddpm.workersName" .) (int .Values.masterPort) }}
{{- else if eq .Values.backend "pytorchjob" }}{{ printf "%s-worker-0:%d" $train (int .Values.masterPort) }}
{{- else if eq .Values.backend "jobset" }}{{/* the replicated Job `leader`'s pod, on the JobSet's Service <jobset> */}}
{{- printf "%s-leader-0-0.%s:%d" $train $train (int .Values.masterPort) }}
{{- else }}{{/* trainjob: the JobSet's Job <trainjob>-node-0, its pod 0, on the JobSet's Service <trainjob> */}}
{{- printf "%s-node-0-0.%s:%d" $train $train (int .Values.masterPort) }}{{ end }}
{{- end }}

{{/*
The labels of rank 0's pod (node 0, which hosts the rendezvous and, with tensorboard.mode=sidecar, the TensorBoard the
Service shows), as each controller labels its pods.
*/}}
{{- define "ddpm.rank0Selector" -}}
{{ include "ddpm.selectorLabels" . }}
app.kubernetes.io/component: train
{{- if eq .Values.backend "job" }}
batch.kubernetes.io/job-completion-index: "0"
{{- else if eq .Values.backend "jobset" }}
jobset.sigs.k8s.io/replicatedjob-name: leader
{{- else if eq .Values.backend "pytorchjob" }}
training.kubeflow.org/replica-type: worker
training.kubeflow.org/replica-index: "0"
{{- else }}
jobset.sigs.k8s.io/replicatedjob-name: node
jobset.sigs.k8s.io/job-index: "0"
batch.kubernetes.io/job-completion-index: "0"
{{- end }}
{{- end }}

{{/*
Bytes in a Kubernetes quantity ("16Gi", "512Mi", "2G", "1e9", 1073741824), as an integer string; 0 for empty.
*/}}
{{- define "ddpm.bytes" -}}
{{- $q := toString . | trim }}
{{- if not $q }}0{{ else }}
{{- $suffix := regexFind "(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)$" $q }}
{{- $number := trimSuffix $suffix $q | float64 }}
{{- $factor := get (dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18
  "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0) $suffix }}
{{- printf "%.0f" (mulf $number $factor) }}
{{- end }}
{{- end }}

{{/* /dev/shm size: shm.sizeLimit, or shm.perProcessGiB x processes. */}}
{{- define "ddpm.shmSize" -}}
{{- if .Values.shm.sizeLimit }}{{ .Values.shm.sizeLimit }}
{{- else }}{{ include "ddpm.gibQuantity" (mulf .Values.shm.perProcessGiB (include "ddpm.procsPerNode" . | int)) }}{{ end }}
{{- end }}

{{/* A number of GiB as a quantity: "16Gi", or "1536Mi" for fractions. */}}
{{- define "ddpm.gibQuantity" -}}
{{- $mib := mulf . 1024 | ceil | int }}
{{- if eq (mod $mib 1024) 0 }}{{ div $mib 1024 }}Gi{{ else }}{{ $mib }}Mi{{ end }}
{{- end }}

{{/*
The training container's resources: .Values.resources, or when empty defaultResources per process plus /dev/shm
(memory limit = request); either way with the GPU limit from gpus/gpusPerNode.
*/}}
{{- define "ddpm.trainResources" -}}
{{- $procs := include "ddpm.procsPerNode" . | int }}
{{- $resources := deepCopy .Values.resources }}
{{- if not $resources }}
{{- $cpuMilli := mulf .Values.defaultResources.cpuPerProcess 1000 $procs | ceil | int }}
{{- $cpu := ternary (toString (div $cpuMilli 1000)) (printf "%dm" $cpuMilli) (eq (mod $cpuMilli 1000) 0) }}
{{- $shmGiB := divf (include "ddpm.bytes" (include "ddpm.shmSize" .) | float64) 1073741824.0 }}
{{- $memory := include "ddpm.gibQuantity" (addf $shmGiB (mulf .Values.defaultResources.memoryGiBPerProcess $procs)) }}
{{- $resources = dict "requests" (dict "cpu" $cpu "memory" $memory) "limits" (dict "memory" $memory) }}
{{- end }}
{{- $limits := get $resources "limits" | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" $procs }}
{{- $_ := set $resources "limits" $limits }}
{{- toYaml $resources }}
{{- end }}
