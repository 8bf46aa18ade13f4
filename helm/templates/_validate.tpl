{{/*
Every combination of values that cannot work, gathered and reported at once (values.schema.json has already
checked each value on its own), and the cluster APIs the backend needs. Included by configmap.yaml, which every
install renders.
*/}}
{{- define "ddpm.validateValues" -}}
{{- $problems := list }}
{{- $v := .Values }}
{{- $gpus := int $v.gpus }}
{{- $perNode := int $v.gpusPerNode }}
{{- $nodes := div (add $gpus $perNode -1) $perNode }}{{/* rounded up: the storage check also holds while gpus is still wrong */}}
{{- $procs := include "ddpm.procsPerNode" . | int }}
{{- $rwxClasses := "GKE Filestore standard-rwx, EKS EFS efs-sc, AKS azurefile-csi, or an NFS class" }}

{{- if and (gt $gpus $perNode) (ne (mod $gpus $perNode) 0) }}
{{- $problems = append $problems (printf "gpus=%d is more than one node's gpusPerNode=%d, so it must be a multiple of it (e.g. %d or %d)" $gpus $perNode (mul (div $gpus $perNode) $perNode) (mul (add1 (div $gpus $perNode)) $perNode)) }}
{{- end }}

{{- /* ---- storage ---- */}}
{{- $rwx := has "ReadWriteMany" $v.storage.accessModes }}
{{- if and (gt $nodes 1) (not $rwx) }}
{{- $problems = append $problems (printf "gpus=%d needs %d nodes sharing the volume, but storage.accessModes %v cannot be shared: set storage.accessModes={ReadWriteMany} with storage.storageClass of a ReadWriteMany class (%s), or storage.existingClaim of a ReadWriteMany claim with storage.accessModes={ReadWriteMany}, or run on one node (gpus <= gpusPerNode=%d)" $gpus $nodes $v.storage.accessModes $rwxClasses $perNode) }}
{{- end }}
{{- if and $rwx (not $v.storage.existingClaim) (not $v.storage.storageClass) }}
{{- $problems = append $problems (printf "storage.accessModes asks for ReadWriteMany from the cluster's default StorageClass, which on GKE (standard-rwo), EKS (gp2/gp3) and AKS (managed-csi) cannot provide it, so the claim would stay Pending: set storage.storageClass to a ReadWriteMany class (%s), or use storage.existingClaim" $rwxClasses) }}
{{- end }}
{{- /* Another pod that mounts a single-node volume could take it to its node first (WaitForFirstConsumer binds it
where the first pod lands) and leave the trainer Pending: only the training pods mount it then. */}}
{{- if not $rwx }}
{{- if and $v.tensorboard.enabled (eq $v.tensorboard.mode "deployment") }}
{{- $problems = append $problems (printf "tensorboard.mode=deployment mounts the volume from a pod of its own, which needs ReadWriteMany storage (storage.accessModes %v): on a single-node volume it could take the volume to its node first and the trainer would never start. Use tensorboard.mode=sidecar (default), or ReadWriteMany storage (%s)" $v.storage.accessModes $rwxClasses) }}
{{- end }}
{{- if and $v.push.enabled (eq $v.push.mode "job") }}
{{- $problems = append $problems (printf "push.mode=job mounts the volume from a pod of its own, which needs ReadWriteMany storage (storage.accessModes %v): on a single-node volume it could take the volume to its node first and the trainer would never start. Use push.mode=trainer (default: rank 0 pushes), or ReadWriteMany storage (%s)" $v.storage.accessModes $rwxClasses) }}
{{- end }}
{{- end }}

{{- /* ---- the push ---- */}}
{{- if $v.push.enabled }}
{{- if not $v.config.hub_model_id }}
{{- $problems = append $problems "push.enabled needs the Hub repo: set config.hub_model_id (e.g. your-name/ddpm-butterflies-128)" }}
{{- end }}
{{- if not $v.push.tokenSecret }}
{{- $problems = append $problems "push.enabled needs push.tokenSecret, the name of an existing Secret with a Hub write token (kubectl create secret generic hf-token --from-literal=token=hf_...)" }}
{{- end }}
{{- $waitAndPush := add $v.push.waitTimeoutSeconds $v.push.deadlineSeconds }}
{{- if and (not (kindIs "invalid" $v.push.activeDeadlineSeconds)) (le (int64 $v.push.activeDeadlineSeconds) (int64 $waitAndPush)) }}
{{- $problems = append $problems (printf "push.activeDeadlineSeconds=%v must be larger than push.waitTimeoutSeconds + push.deadlineSeconds = %d, or the Job is killed before the wait or the upload can end on its own" $v.push.activeDeadlineSeconds $waitAndPush) }}
{{- end }}
{{- end }}

{{- /* ---- preemption ---- */}}
{{- $grace := $v.config.preemption_grace_seconds | default 90 | float64 }}
{{- if le (float64 $v.terminationGracePeriodSeconds) $grace }}
{{- $problems = append $problems (printf "terminationGracePeriodSeconds=%v must be larger than config.preemption_grace_seconds=%v, or Kubernetes kills the trainer before its preemption checkpoint is written" $v.terminationGracePeriodSeconds $grace) }}
{{- end }}
{{- if and $v.preemptionNoticeSeconds (ge $grace (float64 $v.preemptionNoticeSeconds)) }}
{{- $problems = append $problems (printf "config.preemption_grace_seconds=%v does not fit in the node's preemption notice preemptionNoticeSeconds=%v: the node is gone before the preemption checkpoint is written, and the steps since the last periodic checkpoint (config.checkpointing_steps) are lost; set config.preemption_grace_seconds below %v" $grace $v.preemptionNoticeSeconds $v.preemptionNoticeSeconds) }}
{{- end }}

{{- /* ---- resources ---- */}}
{{- if hasKey ($v.resources.limits | default dict) "nvidia.com/gpu" }}
{{- $problems = append $problems "resources.limits must not set nvidia.com/gpu: the chart sets it from gpus and gpusPerNode" }}
{{- end }}
{{- if hasKey ($v.resources.requests | default dict) "nvidia.com/gpu" }}
{{- $problems = append $problems "resources.requests must not set nvidia.com/gpu: the chart sets it from gpus and gpusPerNode" }}
{{- end }}
{{- if $v.resources }}
{{- $memory := (get ($v.resources.requests | default dict) "memory") | default (get ($v.resources.limits | default dict) "memory") }}
{{- $shm := include "ddpm.shmSize" . }}
{{- $needed := add (include "ddpm.bytes" $shm | int64) (mul $procs 1073741824) }}
{{- if not $memory }}
{{- $problems = append $problems "resources sets no memory: set resources.requests.memory (and limits.memory) to cover /dev/shm plus the processes, or leave resources empty for the chart's default" }}
{{- else if lt (include "ddpm.bytes" $memory | int64) $needed }}
{{- $problems = append $problems (printf "resources.requests.memory=%v does not cover /dev/shm (shm.sizeLimit %s, counted as the pod's memory) plus 1Gi for each of the %d processes: request at least %s" $memory $shm $procs (include "ddpm.gibQuantity" (divf $needed 1073741824.0))) }}
{{- end }}
{{- end }}

{{- /* ---- paths and env ---- */}}
{{- with $v.config.data_cache_dir }}
{{- if not (hasPrefix "/data/" .) }}
{{- $problems = append $problems (printf "config.data_cache_dir=%s is not on the volume: leave it unset (default %s/data-cache) or use a path under /data/" . (include "ddpm.dataPath" $)) }}
{{- end }}
{{- end }}

{{- with $v.config.output_dir }}
{{- if not (hasPrefix "/data/" .) }}
{{- $problems = append $problems (printf "config.output_dir=%s is not on the volume: leave it unset (default %s/output) or use a path under /data/" . (include "ddpm.dataPath" $)) }}
{{- end }}
{{- end }}

{{- range $v.extraEnv }}
{{- if and (hasKey . "value") (regexMatch "(?i)(TOKEN|SECRET|PASSWORD|API_?KEY)" .name) }}
{{- $problems = append $problems (printf "extraEnv %s has a literal value: credentials must come from a Secret (valueFrom.secretKeyRef), never from values" .name) }}
{{- end }}
{{- if hasPrefix "DDPM_" .name }}
{{- $problems = append $problems (printf "extraEnv %s: DDPM_* variables are TrainingConfig fields, set them as config.%s" .name (lower (trimPrefix "DDPM_" .name))) }}
{{- end }}
{{- end }}

{{- with $v.podSecurityContext }}
{{- if and (hasKey . "runAsUser") (eq (int .runAsUser) 0) }}
{{- $problems = append $problems "podSecurityContext.runAsUser must not be 0: the trainer runs as the image's user 1000 (for a volume the pod cannot write, see storage.fixOwnership)" }}
{{- end }}
{{- end }}

{{- /* ---- backends ---- */}}
{{- if and $v.kubeflow.schedulingPolicy (ne $v.backend "pytorchjob") }}
{{- $problems = append $problems (printf "kubeflow.schedulingPolicy is a PyTorchJob setting, but backend=%s: for a Job or JobSet use Kueue (queueName), for a TrainJob kubeflow.trainingRuntime.podGroupPolicy" $v.backend) }}
{{- end }}
{{- if and $v.jobset.exclusiveTopology (ne $v.backend "jobset") }}
{{- $problems = append $problems (printf "jobset.exclusiveTopology is a JobSet setting, but backend=%s: use backend=jobset, or affinity for the training pods" $v.backend) }}
{{- end }}
{{- if eq $v.backend "jobset" }}
{{- /* The JobSet webhook (pkg/webhooks/jobset_webhook.go ValidateCreate) requires its pods' names,
<jobset>-<replicated job>-0-<index>-<5 random characters>, to be DNS-1035 labels: 63 characters, starting with a
letter. */}}
{{- $longestPod := printf "%s-workers-0-%d-abcde" (include "ddpm.trainName" .) (sub (include "ddpm.nodes" . | int) 1) }}
{{- if or (gt (len $longestPod) 63) (not (regexMatch "^[a-z]" $longestPod)) }}
{{- $problems = append $problems (printf "backend=jobset names its pods like %s, which the JobSet webhook refuses (a DNS-1035 label: at most 63 characters, starting with a letter): use a shorter fullnameOverride starting with a letter" $longestPod) }}
{{- end }}
{{- end }}


{{- if and (eq $v.backend "pytorchjob") (not (kindIs "invalid" $v.backoffLimit)) (eq (int $v.backoffLimit) 0) }}
{{- $problems = append $problems "backoffLimit=0 with backend=pytorchjob fails the PyTorchJob at its first failed pod, preemptions included (training-operator pkg/controller.v1/common/job.go exceedsBackoffLimit): leave it null or >= 1" }}
{{- end }}
{{- if and (eq $v.backend "trainjob") (not $v.kubeflow.trainingRuntime.create) }}
{{- $unsupported := list }}
{{- if $v.priorityClassName }}{{ $unsupported = append $unsupported "priorityClassName" }}{{ end }}
{{- if $v.runtimeClassName }}{{ $unsupported = append $unsupported "runtimeClassName" }}{{ end }}
{{- if $v.topologySpreadConstraints }}{{ $unsupported = append $unsupported "topologySpreadConstraints" }}{{ end }}
{{- if $v.initContainers }}{{ $unsupported = append $unsupported "initContainers" }}{{ end }}
{{- if $v.envFrom }}{{ $unsupported = append $unsupported "envFrom" }}{{ end }}
{{- if $v.storage.fixOwnership }}{{ $unsupported = append $unsupported "storage.fixOwnership" }}{{ end }}
{{- if not (kindIs "invalid" $v.ttlSecondsAfterFinished) }}{{ $unsupported = append $unsupported "ttlSecondsAfterFinished" }}{{ end }}
{{- if not (kindIs "invalid" $v.backoffLimit) }}{{ $unsupported = append $unsupported "backoffLimit" }}{{ end }}
{{- if $v.kubeflow.trainingRuntime.podGroupPolicy }}{{ $unsupported = append $unsupported "kubeflow.trainingRuntime.podGroupPolicy" }}{{ end }}
{{- if include "ddpm.tensorboardSidecar" . }}
{{- $problems = append $problems (printf "tensorboard.mode=sidecar cannot add TensorBoard to the pods of the stock runtime %s/%s (TrainJob runtimePatches cannot add a container): set kubeflow.trainingRuntime.create=true, or tensorboard.enabled=false, or tensorboard.mode=deployment with ReadWriteMany storage" $v.kubeflow.runtimeKind $v.kubeflow.runtimeName) }}
{{- end }}
{{- if $unsupported }}
{{- $problems = append $problems (printf "%s cannot reach the pods of the stock runtime %s/%s (TrainJob runtimePatches allow only volumes, mounts, securityContext, scheduling and the grace period): set kubeflow.trainingRuntime.create=true" (join ", " $unsupported) $v.kubeflow.runtimeKind $v.kubeflow.runtimeName) }}
{{- end }}
{{- end }}

{{- /* ---- queueing ---- */}}
{{- range $key := list "kueue.x-k8s.io/queue-name" "kueue.x-k8s.io/priority-class" }}
{{- if hasKey $v.jobLabels $key }}
{{- $problems = append $problems (printf "jobLabels must not set %s: set %s" $key (ternary "queueName" "workloadPriorityClassName" (eq $key "kueue.x-k8s.io/queue-name"))) }}
{{- end }}
{{- end }}
{{- if and $v.workloadPriorityClassName (not $v.queueName) }}
{{- $problems = append $problems "workloadPriorityClassName is a Kueue priority, which only a queued run has: set queueName too" }}
{{- end }}

{{- /* ---- elastic training and the global batch ---- */}}
{{- $tbs := include "ddpm.trainBatchSize" . | int }}
{{- $gas := include "ddpm.gradientAccumulation" . | int }}
{{- $global := include "ddpm.globalBatchSize" . }}
{{- $maxNodes := include "ddpm.nodes" . | int }}
{{- $minNodes := include "ddpm.minNodes" . | int }}
{{- if $v.elastic.enabled }}
{{- if eq $v.backend "trainjob" }}
{{- $problems = append $problems "elastic.enabled is not possible with backend=trainjob: the Trainer's torch plugin sets PET_NNODES to the node count itself (kubeflow/trainer pkg/runtime/framework/plugins/torch/torch.go); use backend=job, jobset or pytorchjob" }}
{{- end }}
{{- if and (not (kindIs "invalid" $v.elastic.maxNodes)) (ne (int $v.elastic.maxNodes) $maxNodes) }}
{{- $problems = append $problems (printf "elastic.maxNodes=%d but gpus=%d with gpusPerNode=%d makes %d pods: leave elastic.maxNodes empty, or set gpus=%d" (int $v.elastic.maxNodes) $gpus $perNode $maxNodes (mul (int $v.elastic.maxNodes) $procs)) }}
{{- end }}
{{- if ge (int $v.elastic.minNodes) $maxNodes }}
{{- $problems = append $problems (printf "elastic.minNodes=%d must be below the %d node(s) of gpus=%d / gpusPerNode=%d, or there is nothing to be elastic about: lower elastic.minNodes, raise gpus, or set elastic.enabled=false" (int $v.elastic.minNodes) $maxNodes $gpus $perNode) }}
{{- end }}
{{- end }}
{{- if and $global (le $minNodes $maxNodes) }}
{{- /* Every node count the run may train on must split the global batch into whole micro-batches per process. */}}
{{- $bad := list }}
{{- range $n := untilStep $minNodes (add1 $maxNodes | int) 1 }}
{{- if ne (mod ($global | int64) (mul $tbs $n $procs)) 0 }}{{ $bad = append $bad $n }}{{ end }}
{{- end }}
{{- if $bad }}
{{- /* lcm of the node counts, for the fix (capped: past it no accumulation is practical) */}}
{{- $lcm := 1 }}
{{- range $n := untilStep $minNodes (add1 $maxNodes | int) 1 }}
{{- if le $lcm 1000000 }}
{{- $k := 0 }}
{{- range $i := untilStep 1 (add1 $n | int) 1 }}{{ if and (eq $k 0) (eq (mod (mul $lcm $i) $n) 0) }}{{ $k = $i }}{{ end }}{{ end }}
{{- $lcm = mul $lcm $k }}
{{- end }}
{{- end }}
{{- $unit := mul $tbs $procs $lcm }}
{{- $fixes := list }}
{{- if gt $lcm 1000000 }}
{{- $fixes = append $fixes "no global batch fits so many node counts: narrow the range" }}
{{- else if kindIs "invalid" $v.config.global_batch_size }}
{{- $step := div $lcm $maxNodes }}
{{- $newGas := mul $step (div (add $gas $step -1) $step) }}
{{- $fixes = append $fixes (printf "set config.gradient_accumulation_steps=%d (a global batch of %d x %d x %d x %d = %d)" $newGas $tbs $newGas $maxNodes $procs (mul $tbs $newGas $maxNodes $procs)) }}
{{- else }}
{{- $fixes = append $fixes (printf "set config.global_batch_size to a multiple of %d = train_batch_size %d x %d processes per node x %d (e.g. %d)" $unit $tbs $procs $lcm (mul $unit (div (add ($global | int64) $unit -1) $unit))) }}
{{- end }}
{{- $fromMin := add1 (last $bad) }}
{{- if and $v.elastic.enabled (lt $fromMin $maxNodes) }}
{{- $fixes = append $fixes (printf "set elastic.minNodes=%d" $fromMin) }}
{{- end }}
{{- $where := printf "%d node(s)" $maxNodes }}
{{- if $v.elastic.enabled }}{{ $where = printf "%s node(s) (elastic: any count from %d to %d)" (join ", " $bad) $minNodes $maxNodes }}{{ end }}
{{- $problems = append $problems (printf "config.global_batch_size=%s cannot be split into whole micro-batches of config.train_batch_size=%d over %s with %d process(es) each (the trainer would exit 2): %s" $global $tbs $where $procs (join ", or " $fixes)) }}
{{- end }}
{{- end }}

{{- /* ---- RBAC ---- */}}
{{- if and $v.rbac.create (not $v.serviceAccount.create) (not $v.serviceAccount.name) }}
{{- $problems = append $problems "rbac.create would bind the trainer's Role to the namespace's `default` ServiceAccount, which every pod without its own uses: set serviceAccount.create=true or serviceAccount.name, or rbac.create=false" }}
{{- end }}

{{- if and $v.checkAPIVersions (ne $v.backend "job") }}
{{- $needed := get (dict "jobset" (list "jobset.x-k8s.io/v1alpha2/JobSet") "pytorchjob" (list "kubeflow.org/v1/PyTorchJob") "trainjob" (list "trainer.kubeflow.org/v1alpha1/TrainJob")) $v.backend }}
{{- if and (eq $v.backend "trainjob") $v.kubeflow.trainingRuntime.create }}{{ $needed = append $needed "trainer.kubeflow.org/v1alpha1/TrainingRuntime" }}{{ end }}
{{- $operator := get (dict "jobset" "JobSet >= 0.10 (onJobFailureMessagePatterns)" "pytorchjob" "the Kubeflow Training Operator >= 1.8 (exit codes 1-127 fail the job)" "trainjob" "Kubeflow Trainer >= 2.3 (runtimePatches)") $v.backend }}
{{- range $needed }}
{{- if not ($.Capabilities.APIVersions.Has .) }}
{{- $problems = append $problems (printf "backend=%s needs the API %s, which this cluster does not serve: install %s, or render offline with `helm template --api-versions %s ...`" $v.backend . $operator .) }}
{{- end }}
{{- end }}
{{- end }}

{{- if $problems }}
{{- fail (printf "\n\nINVALID VALUES (%d problem%s):\n  - %s\n" (len $problems) (ternary "" "s" (eq (len $problems) 1)) (join "\n  - " $problems)) }}
{{- end }}
{{- end }}
