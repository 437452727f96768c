#!/bin/sh
# Rendered by mesh deploy render from campus.yaml (mesh campus); edit the topology and render again.
#
# Creates (or updates) the Secret tiermesh-certs-NODE that each node's pod mounts at
# /etc/tiermesh/tls: ca.pem, node.pem, node-key.pem, as `mesh certs issue` writes them.
#
#   mesh certs init --dir certs          # once: the mesh CA
#   TOPOLOGY=campus.yaml NAMESPACE=tiermesh sh create-secrets.sh certs
#
# With TOPOLOGY set, a node's missing certificate is issued first (mesh certs issue).
# kubectl apply -f on this folder skips this file (not YAML); keys never go in a manifest.
set -eu
certs=${1:-certs}
for node in \
    dc-1 \
    dc-gpu-1 \
    science \
    library \
    sports \
    medicine \
    lib-kiosk-1 \
    lib-kiosk-2 \
    gym-gate \
    science-lab-1 \
    science-lab-2 \
    science-lab-3 \
    science-lab-4 \
    science-lab-5 \
    science-lab-6 \
    science-lab-7 \
    science-lab-8 \
    science-lab-9 \
    science-lab-10 \
    science-lab-11 \
    science-lab-12 \
    med-ward-1 \
    med-ward-2 \
    med-ward-3 \
    med-ward-4 \
    med-ward-5 \
    med-ward-6 \
    med-ward-7 \
    med-ward-8 \
    med-ward-9 \
    med-ward-10
do
    if [ ! -f "$certs/$node/node.pem" ] && [ -n "${TOPOLOGY:-}" ]; then
        mesh certs issue "$node" --topology "$TOPOLOGY" --dir "$certs"
    fi
    for file in ca.pem node.pem node-key.pem; do
        [ -f "$certs/$node/$file" ] || {
            echo "missing $certs/$node/$file: run mesh certs issue $node --topology campus.yaml --dir $certs" >&2
            exit 1
        }
    done
    kubectl ${NAMESPACE:+--namespace "$NAMESPACE"} create secret generic "tiermesh-certs-$node" \
        --from-file=ca.pem="$certs/$node/ca.pem" \
        --from-file=node.pem="$certs/$node/node.pem" \
        --from-file=node-key.pem="$certs/$node/node-key.pem" \
        --dry-run=client --output=yaml \
        | kubectl ${NAMESPACE:+--namespace "$NAMESPACE"} apply -f -
done
