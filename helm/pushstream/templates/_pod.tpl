{{/* The worker pod, shared by the StatefulSet and the Deployment. */}}
{{- define "pushstream.podTemplate" -}}
metadata:
  labels:
    {{- include "pushstream.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A changed ConfigMap or Secret rolls the workers.
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    checksum/credentials: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "pushstream.serviceAccountName" . }}
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # Above the worker's shutdown timeout: it commits offsets and flushes
  # RocksDB after SIGTERM.
  terminationGracePeriodSeconds: {{ include "pushstream.gracePeriod" . }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: worker
      image: {{ include "pushstream.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["worker"]
      ports:
        - name: web
          containerPort: {{ .Values.web.port }}
          protocol: TCP
      envFrom:
        - configMapRef:
            name: {{ include "pushstream.fullname" . }}
      env:
        {{- include "pushstream.kafkaEnv" . | nindent 8 }}
      startupProbe:
        httpGet:
          path: /health
          port: web
        periodSeconds: {{ .Values.probes.startup.periodSeconds }}
        failureThreshold: {{ .Values.probes.startup.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /health
          port: web
        initialDelaySeconds: {{ .Values.probes.liveness.initialDelaySeconds }}
        periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /ready
          port: web
        periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /var/lib/pushstream/data
        - name: tmp
          mountPath: /tmp
        {{- if include "pushstream.credentialsSecret" . }}
        - name: credentials
          mountPath: /etc/pushstream/credentials
          readOnly: true
        {{- end }}
        {{- if .Values.kafka.tls.secretName }}
        - name: kafka-tls
          mountPath: /etc/pushstream/kafka-tls
          readOnly: true
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        medium: Memory
        sizeLimit: 16Mi
    {{- if eq .Values.storage.mode "deployment" }}
    - name: data
      emptyDir:
        sizeLimit: {{ .Values.storage.emptyDirSizeLimit }}
    {{- end }}
    {{- if include "pushstream.credentialsSecret" . }}
    - name: credentials
      secret:
        secretName: {{ include "pushstream.credentialsSecret" . }}
        defaultMode: 0400
    {{- end }}
    {{- if .Values.kafka.tls.secretName }}
    - name: kafka-tls
      secret:
        secretName: {{ .Values.kafka.tls.secretName }}
        defaultMode: 0400
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.affinity }}
  affinity:
    {{- toYaml .Values.affinity | nindent 4 }}
  {{- else }}
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "pushstream.selectorLabels" . | nindent 16 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
