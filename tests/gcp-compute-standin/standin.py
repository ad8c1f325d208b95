#!/usr/bin/env python3
"""A STAND-IN for the Compute Engine v1 images and global operations API, for the tests of
`pilot-image publish --target gcp` (image/tests/gcp_publish.rs). Not Google's code: it follows
the documented API as strictly as the tests need, and no stricter than the real service.

  https://cloud.google.com/compute/docs/reference/rest/v1/images
  https://cloud.google.com/compute/docs/reference/rest/v1/globalOperations
  https://cloud.google.com/compute/docs/import/import-existing-image (the tar.gz rules)

Served: images.insert, images.get, images.list (filter `labels.KEY=VALUE` or `name=NAME`),
images.delete, globalOperations.get and globalOperations.wait, under /compute/v1. Every call
needs `Authorization: Bearer TOKEN` with the token from env STANDIN_TOKEN (never on the command
line, where `ps` shows it). images.insert checks the request body like the real API (unknown
fields, the name, family, labels, guestOsFeatures and architecture enums, exactly one source of
which only rawDisk is served here), makes the image PENDING and returns a PENDING operation;
the import then runs in a thread: RUNNING, the tarball fetched from the Cloud Storage emulator
(rawDisk.source `https://storage.googleapis.com/BUCKET/OBJECT` is read from the emulator given
with --storage), checked as the importer does (gzip'd tar, one member named disk.raw, a
regular or GNU sparse file whose size is a whole number of GiB), then DONE with the image
READY, or DONE with an error and no image (also, as a test hook, for an image named
`refuse-import*`). Operations go PENDING -> RUNNING -> DONE, each
state lasting at least --delay seconds. State is in memory only.

Why Python/Flask: the Cloud Storage emulator is Python in the same venv, Flask is already
there for moto, and Python's tarfile reads GNU sparse members, which is the check that matters.
"""

import argparse
import gzip
import io
import os
import re
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone

from flask import Flask, jsonify, request

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
GIB = 1 << 30
# guestOsFeatures[].type (the Image resource's enum).
GUEST_OS_FEATURES = {
    "FEATURE_TYPE_UNSPECIFIED", "VIRTIO_SCSI_MULTIQUEUE", "WINDOWS", "MULTI_IP_SUBNET",
    "UEFI_COMPATIBLE", "SECURE_BOOT", "GVNIC", "SEV_CAPABLE", "SUSPEND_RESUME_COMPATIBLE",
    "SEV_LIVE_MIGRATABLE", "SEV_SNP_CAPABLE", "TDX_CAPABLE", "IDPF", "SEV_LIVE_MIGRATABLE_V2",
    "BARE_METAL_LINUX_COMPATIBLE", "SNP_SVSM_CAPABLE",
}
ARCHITECTURES = {"ARCHITECTURE_UNSPECIFIED", "X86_64", "ARM64"}
# The Image resource's writable and output fields: anything else is refused, as the real
# API refuses unknown names in a JSON payload.
IMAGE_FIELDS = {
    "kind", "id", "creationTimestamp", "name", "description", "sourceType", "rawDisk",
    "deprecated", "status", "archiveSizeBytes", "diskSizeGb", "sourceDisk", "sourceDiskId",
    "licenses", "family", "imageEncryptionKey", "sourceDiskEncryptionKey", "selfLink",
    "labels", "labelFingerprint", "guestOsFeatures", "licenseCodes", "sourceImage",
    "sourceImageId", "sourceImageEncryptionKey", "sourceSnapshot", "sourceSnapshotId",
    "sourceSnapshotEncryptionKey", "storageLocations", "shieldedInstanceInitialState",
    "satisfiesPzs", "architecture", "enableConfidentialCompute", "params",
}
RAW_DISK_FIELDS = {"source", "sha1Checksum", "containerType"}
# imageEncryptionKey (a CustomerEncryptionKey): exactly one of the key fields.
ENCRYPTION_KEY_FIELDS = {"rawKey", "rsaEncryptedKey", "kmsKeyName", "sha256", "kmsKeyServiceAccount"}
KMS_KEY_RE = re.compile(
    r"^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+(/cryptoKeyVersions/[^/]+)?$")

app = Flask(__name__)
lock = threading.Condition()
images = {}  # (project, name) -> image dict
operations = {}  # (project, name) -> operation dict
ARGS = None


def now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def error(code, reason, message, status=None):
    body = {"error": {"code": code, "message": message,
                      "errors": [{"message": message, "domain": "global", "reason": reason}]}}
    if status:
        body["error"]["status"] = status
    return jsonify(body), code


def base():
    return f"http://127.0.0.1:{ARGS.port}/compute/v1"


@app.before_request
def authenticate():
    token = os.environ.get("STANDIN_TOKEN", "")
    got = request.headers.get("Authorization", "")
    if not token or got != f"Bearer {token}":
        return error(401, "authError" if got else "required",
                     "Request is missing required authentication credential."
                     if not got else "Request had invalid authentication credentials.",
                     "UNAUTHENTICATED")
    return None


def new_operation(project, kind, target):
    name = f"operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
    op = {
        "kind": "compute#operation", "id": str(uuid.uuid4().int >> 64), "name": name,
        "operationType": kind, "targetLink": target, "status": "PENDING", "progress": 0,
        "insertTime": now(), "user": "standin@example.iam.gserviceaccount.com",
        "selfLink": f"{base()}/projects/{project}/global/operations/{name}",
    }
    operations[(project, name)] = op
    return op


def set_status(op, status, **extra):
    with lock:
        op["status"] = status
        if status == "RUNNING":
            op["startTime"] = now()
        if status == "DONE":
            op["endTime"] = now()
            op["progress"] = 100
        op.update(extra)
        lock.notify_all()


def fail(op, code, message, http=400):
    set_status(op, "DONE", error={"errors": [{"code": code, "message": message}]},
               httpErrorStatusCode=http, httpErrorMessage="BAD REQUEST")


def fetch(source):
    """The object behind rawDisk.source, from the Cloud Storage emulator."""
    m = re.match(r"^(https://storage\.googleapis\.com|" + re.escape(ARGS.storage) +
                 r")/([^/]+)/(.+)$", source)
    if not m:
        raise ValueError(f"rawDisk.source {source!r} is not a Cloud Storage URL "
                         "(https://storage.googleapis.com/BUCKET/OBJECT)")
    url = f"{ARGS.storage}/{m.group(2)}/{m.group(3)}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise LookupError(f"The resource '{source}' was not found ({e.code})") from e


def check_tarball(data):
    """What the importer requires of the archive; returns the disk's size."""
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise ValueError(f"the image archive is not gzip-compressed: {e}") from e
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError as e:
        raise ValueError(f"the image archive is not a tar file: {e}") from e
    names = [m.name for m in members]
    if names != ["disk.raw"]:
        raise ValueError(f"the archive must hold exactly one file named disk.raw, holds {names}")
    m = members[0]
    if not (m.isreg() or m.issparse()):
        raise ValueError("disk.raw is not a regular file")
    if m.size == 0 or m.size % GIB != 0:
        raise ValueError(f"disk.raw is {m.size} bytes, not a whole number of GiB")
    return m.size, m.issparse()


def importer(project, name, op, source):
    time.sleep(ARGS.delay)
    set_status(op, "RUNNING", progress=10)
    time.sleep(ARGS.delay)
    try:
        data = fetch(source)
        size, sparse = check_tarball(data)
        if name.startswith("refuse-import"):
            # Test hook: an import the service refuses after it started (a disk it cannot
            # boot, say), to reach the caller's operation-error path with a valid tarball.
            raise ValueError("the stand-in refuses images named refuse-import* (test hook)")
    except LookupError as e:
        with lock:
            images.pop((project, name), None)
        fail(op, "RESOURCE_NOT_FOUND", str(e), 404)
        return
    except ValueError as e:
        with lock:
            images.pop((project, name), None)
        fail(op, "INVALID_IMAGE_FILE", str(e))
        return
    with lock:
        img = images.get((project, name))
        if img is not None:
            img.update(status="READY", diskSizeGb=str(size // GIB),
                       archiveSizeBytes=str(len(data)))
            img["standinSparse"] = sparse
    set_status(op, "DONE")


def validate(body):
    if not isinstance(body, dict):
        return "Invalid JSON payload: the image must be an object"
    unknown = sorted(set(body) - IMAGE_FIELDS)
    if unknown:
        return f"Invalid JSON payload received. Unknown name {unknown[0]!r}: Cannot find field."
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        return (f"Invalid value for field 'resource.name': {name!r}. Must be a match of regex "
                "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")
    fam = body.get("family")
    if fam is not None and (not isinstance(fam, str) or not NAME_RE.match(fam)):
        return f"Invalid value for field 'resource.family': {fam!r}."
    labels = body.get("labels", {})
    if not isinstance(labels, dict) or len(labels) > 64:
        return "Invalid value for field 'resource.labels'."
    for k, v in labels.items():
        if not LABEL_KEY_RE.match(k) or not isinstance(v, str) or not LABEL_VALUE_RE.match(v):
            return f"Invalid value for field 'resource.labels': {k}={v!r}."
    feats = body.get("guestOsFeatures", [])
    if not isinstance(feats, list):
        return "Invalid value for field 'resource.guestOsFeatures'."
    for f in feats:
        if not isinstance(f, dict) or set(f) - {"type"} or f.get("type") not in GUEST_OS_FEATURES:
            return (f"Invalid value at 'image.guest_os_features' ({f!r}): not a value of "
                    "type.googleapis.com/google.cloud.compute.v1.GuestOsFeature.Type")
    arch = body.get("architecture")
    if arch is not None and arch not in ARCHITECTURES:
        return f"Invalid value at 'image.architecture' ({arch!r})"
    locs = body.get("storageLocations")
    if locs is not None and (not isinstance(locs, list) or len(locs) > 1
                             or not all(isinstance(x, str) and x for x in locs)):
        return "Invalid value for field 'resource.storageLocations'."
    key = body.get("imageEncryptionKey")
    if key is not None:
        given = [k for k in ("rawKey", "rsaEncryptedKey", "kmsKeyName") if key.get(k)] \
            if isinstance(key, dict) else []
        if not isinstance(key, dict) or set(key) - ENCRYPTION_KEY_FIELDS or len(given) != 1:
            return "Invalid value for field 'resource.imageEncryptionKey'."
        if given == ["kmsKeyName"] and not KMS_KEY_RE.match(key["kmsKeyName"]):
            return ("Invalid value for field 'resource.imageEncryptionKey.kmsKeyName': "
                    f"'{key['kmsKeyName']}'.")
    sources = [k for k in ("rawDisk", "sourceDisk", "sourceImage", "sourceSnapshot")
               if body.get(k)]
    if len(sources) != 1:
        return "Exactly one of rawDisk, sourceDisk, sourceImage or sourceSnapshot must be given."
    if sources != ["rawDisk"]:
        return f"The stand-in serves rawDisk imports only, not {sources[0]}"
    raw = body["rawDisk"]
    if not isinstance(raw, dict) or set(raw) - RAW_DISK_FIELDS or not isinstance(
            raw.get("source"), str):
        return "Invalid value for field 'resource.rawDisk'."
    if raw.get("containerType", "TAR") != "TAR":
        return f"Invalid value for field 'resource.rawDisk.containerType': {raw['containerType']!r}."
    return None


@app.post("/compute/v1/projects/<project>/global/images")
def insert(project):
    body = request.get_json(silent=True)
    problem = validate(body)
    if problem:
        return error(400, "invalid", problem)
    name = body["name"]
    with lock:
        if (project, name) in images:
            return error(409, "alreadyExists",
                         f"The resource 'projects/{project}/global/images/{name}' already exists")
        link = f"{base()}/projects/{project}/global/images/{name}"
        img = {k: v for k, v in body.items() if k not in ("status", "selfLink", "id")}
        img.update(kind="compute#image", id=str(uuid.uuid4().int >> 64), status="PENDING",
                   selfLink=link, creationTimestamp=now(), sourceType="RAW")
        images[(project, name)] = img
        op = new_operation(project, "insert", link)
        answer = dict(op)
    threading.Thread(target=importer, args=(project, name, op, body["rawDisk"]["source"]),
                     daemon=True).start()
    return jsonify(answer)


def public(img):
    return {k: v for k, v in img.items() if not k.startswith("standin")}


@app.get("/compute/v1/projects/<project>/global/images/<name>")
def get(project, name):
    with lock:
        img = images.get((project, name))
        if img is None:
            return error(404, "notFound",
                         f"The resource 'projects/{project}/global/images/{name}' was not found")
        return jsonify(public(img))


FILTER_RE = re.compile(r'^\s*(labels\.[a-z][a-z0-9_-]*|name)\s*=\s*"?([a-z0-9_-]*)"?\s*$')


@app.get("/compute/v1/projects/<project>/global/images")
def list_images(project):
    flt = request.args.get("filter")
    match = None
    if flt:
        m = FILTER_RE.match(flt)
        if not m:
            return error(400, "invalid", f"Invalid list filter expression '{flt}'.")
        field, value = m.group(1), m.group(2)
        if field == "name":
            match = lambda img: img["name"] == value  # noqa: E731
        else:
            key = field[len("labels."):]
            match = lambda img: img.get("labels", {}).get(key) == value  # noqa: E731
    with lock:
        items = [public(i) for (p, _), i in sorted(images.items())
                 if p == project and (match is None or match(i))]
    out = {"kind": "compute#imageList", "id": f"projects/{project}/global/images",
           "selfLink": f"{base()}/projects/{project}/global/images"}
    if items:
        out["items"] = items
    return jsonify(out)


def deleter(project, name, op):
    time.sleep(ARGS.delay)
    set_status(op, "RUNNING")
    time.sleep(ARGS.delay)
    with lock:
        images.pop((project, name), None)
    set_status(op, "DONE")


@app.delete("/compute/v1/projects/<project>/global/images/<name>")
def delete(project, name):
    with lock:
        img = images.get((project, name))
        if img is None:
            return error(404, "notFound",
                         f"The resource 'projects/{project}/global/images/{name}' was not found")
        if img["status"] == "PENDING":
            return error(400, "resourceNotReady",
                         f"The resource 'projects/{project}/global/images/{name}' is not ready")
        img["status"] = "DELETING"
        op = new_operation(project, "delete", img["selfLink"])
        answer = dict(op)
    threading.Thread(target=deleter, args=(project, name, op), daemon=True).start()
    return jsonify(answer)


def find_op(project, name):
    op = operations.get((project, name))
    if op is None:
        return None, error(404, "notFound",
                           f"The resource 'projects/{project}/global/operations/{name}' was not found")
    return op, None


@app.get("/compute/v1/projects/<project>/global/operations/<name>")
def get_operation(project, name):
    with lock:
        op, err = find_op(project, name)
        return err or jsonify(op)


@app.post("/compute/v1/projects/<project>/global/operations/<name>/wait")
def wait_operation(project, name):
    # The real wait answers when the operation is DONE or after about two minutes; here after
    # --wait-cap seconds, so that callers' "not DONE yet" path runs too.
    deadline = time.monotonic() + ARGS.wait_cap
    with lock:
        op, err = find_op(project, name)
        if err:
            return err
        while op["status"] != "DONE" and time.monotonic() < deadline:
            lock.wait(timeout=max(0.0, deadline - time.monotonic()))
        return jsonify(dict(op))


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--storage", required=True, help="Cloud Storage emulator, http://127.0.0.1:PORT")
    p.add_argument("--delay", type=float, default=0.2, help="seconds per operation state")
    p.add_argument("--wait-cap", type=float, default=5.0, help="longest globalOperations.wait")
    ARGS = p.parse_args()
    ARGS.storage = ARGS.storage.rstrip("/")
    if not os.environ.get("STANDIN_TOKEN"):
        p.error("env STANDIN_TOKEN (the bearer token to require) is not set")
    app.run(host="127.0.0.1", port=ARGS.port, threaded=True)


if __name__ == "__main__":
    main()
