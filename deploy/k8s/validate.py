"""Strict offline validation of Kubernetes manifests.

Every document is checked against the real Kubernetes JSON schemas of each
version asked for (PyPI `kubernetes-validate`, strict: unknown fields are
errors), and a missing schema (a removed or misspelled apiVersion/kind) is
an error too, where the plain CLI only warns. On top of the schemas, a few
rules the API server enforces that no schema can express are checked
across the documents of all files given: workload selectors match their pod
labels, Job pods do not restart Always, an Indexed Job says how many
completions, every volumeMount names a volume, a StatefulSet's serviceName
and a Service's selector point at something in the set.

Usage: python validate.py --kubernetes-version 1.30.0 [-k ...] FILE...
Prints one line per document and check; exits 1 if any failed.
"""

import argparse
import sys

import kubernetes_validate
import yaml
from kubernetes_validate.utils import VersionNotSupportedError

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def pod_template(doc):
    """The pod template of a workload, or None."""
    if doc.get("kind") in WORKLOADS:
        return (doc.get("spec") or {}).get("template") or {}
    return None


def server_rules(doc, all_docs):
    """Errors the API server (not the schema) would report for `doc`."""
    errors = []
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    template = pod_template(doc)

    if template is not None:
        labels = (template.get("metadata") or {}).get("labels") or {}
        wanted = (spec.get("selector") or {}).get("matchLabels") or {}
        if kind != "Job" or wanted:
            missing = {k: v for k, v in wanted.items() if labels.get(k) != v}
            if missing:
                errors.append(f"selector {missing} does not match the pod labels {labels}")
        pod = template.get("spec") or {}
        volumes = {v.get("name") for v in pod.get("volumes") or []}
        volumes |= {
            (c.get("metadata") or {}).get("name")
            for c in spec.get("volumeClaimTemplates") or []
        }
        for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            for mount in container.get("volumeMounts") or []:
                if mount.get("name") not in volumes:
                    errors.append(
                        f"container {container.get('name')} mounts unknown volume {mount.get('name')}"
                    )

    if kind == "Job":
        pod = (template or {}).get("spec") or {}
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            errors.append(
                f"a Job's restartPolicy must be Never or OnFailure, not {pod.get('restartPolicy')}"
            )
        if spec.get("completionMode") == "Indexed" and spec.get("completions") is None:
            errors.append("an Indexed Job needs completions")

    if kind == "StatefulSet":
        service = spec.get("serviceName")
        if service and not any(
            d.get("kind") == "Service" and d["metadata"].get("name") == service for d in all_docs
        ):
            errors.append(f"serviceName {service} names no Service in these manifests")

    if kind == "Service":
        selector = spec.get("selector") or {}
        if selector and not any(
            all(
                ((pod_template(d).get("metadata") or {}).get("labels") or {}).get(k) == v
                for k, v in selector.items()
            )
            for d in all_docs
            if pod_template(d) is not None
        ):
            errors.append(f"selector {selector} matches no pod template in these manifests")
    return errors


def load(paths):
    """(path, document) for every non-empty YAML document in `paths`."""
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    docs.append((path, doc))
    return docs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--kubernetes-version", action="append", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    try:
        docs = load(args.files)
    except (OSError, yaml.YAMLError) as e:
        print(f"FAIL cannot read the manifests: {e}")
        return 1
    all_docs = [d for _, d in docs]
    n_failed = 0

    def report(name, check, errors):
        nonlocal n_failed
        if errors:
            n_failed += 1
            for error in errors:
                print(f"FAIL {name} ({check}): {error}")
        else:
            print(f"ok   {name} ({check})")

    for path, doc in docs:
        name = f"{path}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        for version in args.kubernetes_version:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                errors = []
            except kubernetes_validate.SchemaNotFoundError as e:
                errors = [e.message]
            except VersionNotSupportedError as e:
                errors = [e.message]
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                errors = [f"{where}: {e.message}"]
            except (KeyError, TypeError) as e:
                errors = [f"not a Kubernetes object ({e})"]
            report(name, f"Kubernetes {version} schema", errors)
        report(name, "API server rules", server_rules(doc, all_docs))
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
