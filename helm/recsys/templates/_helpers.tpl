{{/*
Names. Service names are fixed by the `k8s` settings profile (core/recsys_core/profiles/
k8s.yaml): the ConfigMap tells every pod to reach `recsys-redis` and `recsys-mlflow`, so the
prefix is `fullnameOverride` (default "recsys"), not the release name.
*/}}
{{- define "recsys.fullname" -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "recsys.name" -}}
{{- printf "%s-%s" (include "recsys.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "recsys.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels of one component; call with (dict "root" $ "component" "mlflow"). */}}
{{- define "recsys.componentLabels" -}}
{{ include "recsys.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "recsys.selectorLabels" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference from {repository, tag, digest}; the schema forbids an empty tag. */}}
{{- define "recsys.image" -}}
{{- if .digest -}}
{{- printf "%s:%s@%s" .repository .tag .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{/* Pod security context; call with (dict "root" $ "uid" 1000). */}}
{{- define "recsys.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid | default .uid }}
fsGroup: {{ .gid | default .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container security context; call with (dict "uid" 1000 "readOnly" true). */}}
{{- define "recsys.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .readOnly }}
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The settings ConfigMap as environment (RECSYS_*), shared by every platform container. */}}
{{- define "recsys.configEnvFrom" -}}
- configMapRef:
    name: {{ include "recsys.name" (dict "root" . "component" "config") }}
{{- end -}}

{{/* Labels that let a pod through the NetworkPolicies of the services it names, and only
those: call with a list, e.g. (list "redis" "postgresql"). Serving reads Redis, MLflow and the
Feast SQL registry; training MLflow and the registry; the stream job Redis and the registry. */}}
{{- define "recsys.clientLabels" -}}
{{- range . }}
recsys.io/{{ . }}-client: "true"
{{- end }}
{{- end -}}

{{/*
A Ray pod template (head or worker) on the platform image.
Call with (dict "root" $ "account" "serve" "cluster" "serve" "clients" (list ...) "container"
"ray-head" "resources" {...} "ports" list); "cluster" labels the pod recsys.io/ray-cluster (its
NetworkPolicy), "clients" are the services it may reach (recsys.clientLabels); optional "env"
(a list of name/value) and "labels" (a map) are added to the container and pod, optional
"readinessProbe" (a probe) replaces the one KubeRay would inject into the container.
The root file system is read-only: Ray's session and runtime envs go to /tmp (HOME=/tmp), the
platform's data_dir (/data: landing area, impression WAL) to an emptyDir of its own.
*/}}
{{- define "recsys.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    recsys.io/ray-cluster: {{ .cluster }}
    {{- include "recsys.clientLabels" .clients | nindent 4 }}
    {{- with .labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "recsys.name" (dict "root" $root "component" .account) }}
  securityContext:
    {{- include "recsys.podSecurityContext" (dict "uid" 1000 "gid" 100) | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "recsys.image" $root.Values.images.platform }}
      imagePullPolicy: {{ $root.Values.imagePullPolicy }}
      envFrom:
        {{- include "recsys.configEnvFrom" $root | nindent 8 }}
      env:
        - name: RAY_USAGE_STATS_ENABLED   # no usage reports from inside the cluster
          value: "0"
        - name: HOME                      # runtime envs unpack under $HOME: on the emptyDir
          value: /tmp
        {{- with include "recsys.secretEnv" $root | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .readinessProbe }}
      readinessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      securityContext:
        {{- include "recsys.containerSecurityContext" (dict "uid" 1000 "readOnly" true) | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: data
          mountPath: /data
  volumes:
    - name: tmp
      emptyDir: {}
    - name: data
      emptyDir: {}
{{- end -}}

{{/*
Credentials among the settings (`recsys deploy render-config` leaves them out of the ConfigMap),
read from an existing Secret whose keys are the variable names. A missing Secret stops the pod
rather than letting it run with a development default.
*/}}
{{- define "recsys.secretEnv" -}}
{{- range .Values.platformSecret.env }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.platformSecret.name }}
      key: {{ . }}
{{- end }}
{{- end -}}
