"""Who can do what in a federation: what a site runs, what the server accepts from a site, what a site accepts
from the server, and the server's refusals at start.

The processes tests (a stranger's run, an unlisted SuperNode, a hostile listed site) run with the federation in
test_federated.py; here: a site refuses any Flower App but the federation's own (a real Flower SuperLink, a
real `tcurlora federated client`, a real `flwr run` of someone else's app), and the checks of a site's reply
as the ServerApp receives it (Flower records).
"""

import io
import json
import re
import subprocess
import time

import numpy as np
import pytest
import torch

from tcurlora import cli
from tcurlora.aggregate import read_adapter
from tcurlora.errors import TCURLoRAError
from tcurlora.federated.processes import flower_command, free_port
from conftest import CT, CT_VERT, SUBPROCESS_ENV, assert_one_line_error, cli_subprocess
from federated_processes import flower_env_at, flower_home, interrupt, start_group, stop_group, stranger_app, wait_port

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

CATASTROPHIC = "(.*.*.*.*)*X"  # exponential backtracking in Python's re on a long module name without an X


def test_site_runs_only_the_federations_app(tiny_unet, tmp_path):
    """A run of someone else's app reaches a site (here through a SuperLink whose Control API the test can
    reach, as the server's operator can): the site answers it with an error and never installs or imports it."""
    port = free_port()
    superlink = start_group([flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                             str(port), "--disable-runtime-dependency-installation"],
                            flower_env_at(tmp_path / "server_home"), tmp_path / "superlink.log")
    site = subprocess.Popen(cli_subprocess(
        "federated", "client", *tiny_unet.args, "--server", f"127.0.0.1:{port}", "--insecure",
        "--image", CT, "--label", CT_VERT, "--site", "A", "--out", tmp_path / "site" / "siteA.safetensors"),
        env=SUBPROCESS_ENV, stdout=(tmp_path / "site.log").open("w"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, [superlink, site])
        run = subprocess.run([flower_command("flwr"), "run", stranger_app(tmp_path / "stranger_app"), "x",
                              "--run-config", f'out="{tmp_path / "stranger_result.json"}"', "--stream"],
                             env=flower_home(tmp_path / "operator_home", f"127.0.0.1:{port}"), capture_output=True,
                             text=True, timeout=240)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        alive = site.poll() is None
    finally:
        interrupt(site)
        stop_group(superlink)
    result = json.loads((tmp_path / "stranger_result.json").read_text())
    assert result["nodes"] == 1 and len(result["answers"]) == 1, result
    assert result["answers"][0].startswith("this site runs only the tcurlora federation's ClientApp (app "), result
    assert "refused" in result["answers"][0]
    assert not list(tmp_path.rglob("STRANGER-CODE-RAN"))  # the stranger's ClientApp never ran
    assert alive  # and the site kept serving
    log = (tmp_path / "site.log").read_text(errors="replace")
    assert "tcurlora site: run " in log and "refused" in log


# ----------------------------------------------------------------------------------------------------------
# what the server accepts from a site (the ServerApp's own check, on Flower records)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from monai.networks.nets import UNet

    from tcurlora.adapter import inject_adapter
    from tcurlora.adapter_file import save_adapter
    from tcurlora.config import TCURLoRAConfig

    torch.manual_seed(0)
    model = UNet(3, 1, 2, (4, 8, 8), (2, 2), num_res_units=0)
    inject_adapter(model, TCURLoRAConfig(rank=2))
    path = tmp_path_factory.mktemp("reference") / "ref.safetensors"
    save_adapter(model, path)
    return read_adapter(path)


def reply(manifest, state, cases=3, site="W", arrays=None):
    from tcurlora.federated.client_app import site_update

    content = site_update(manifest, state, cases, site)
    if arrays:
        record = content.array_records["update"]
        content = RecordDict({"update": ArrayRecord({k: arrays.get(k, record[k]) for k in record.keys()}),
                              "meta": content.config_records["meta"], "metrics": content.metric_records["metrics"]})
    return content


def npy(shape, descr="<f4", payload=b""):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=header.getvalue() + payload)


def test_case_counts_are_capped(reference):
    from tcurlora.federated.server import accept_update

    manifest, state = reference
    site, update, cases, weight = accept_update(manifest, state, reply(manifest, state, 2 ** 63 - 1), node=7,
                                                max_cases=50)
    assert (site, cases, weight) == ("W", 2 ** 63 - 1, 50)
    assert accept_update(manifest, state, reply(manifest, state, 12), node=7, max_cases=50)[2:] == (12, 12)
    for bad in (0, -3, 2.5, [4]):
        with pytest.raises(TCURLoRAError, match="site W: reports no training cases"):
            accept_update(manifest, state, reply(manifest, state, bad), node=7)


@pytest.mark.parametrize("name, expected", [
    ("A\nround 2/2: averaged 1 site(s) (A x1)", r"site \(node 7\): site name 'A\\nround 2/2: aver"),
    ("", r"site \(node 7\): site name '' is not a plain name"),
    ("x" * 70_000_000, r"site \(node 7\): site name 'xxx.*\(70,000,000 characters\) is not a plain name"),
    ("\u202eevil", r"site \(node 7\): site name"),
])
def test_bad_site_names_are_refused_in_one_short_line(reference, name, expected):
    from tcurlora.federated.server import accept_update

    manifest, state = reference
    with pytest.raises(TCURLoRAError, match=expected) as refused:
        accept_update(manifest, state, reply(manifest, state, site=name), node=7)
    assert len(str(refused.value)) < 300 and "\n" not in str(refused.value)
    # a listed site is named by its key, but what it reports must still be a plain name
    with pytest.raises(TCURLoRAError, match="site H: site name"):
        accept_update(manifest, state, reply(manifest, state, site=name), node=7, registered="H")


def test_bad_records_are_refused_before_anything_is_allocated(reference):
    from tcurlora.federated.server import accept_update

    manifest, state = reference
    first = next(iter(state))
    shape = tuple(state[first].shape)
    terabyte = npy((2 ** 38,), payload=bytes(64))
    pickle = io.BytesIO()
    np.save(pickle, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=pickle.getvalue())
    size = int(np.prod(shape))
    for array, expected in (
            (terabyte, r"declares float32 \(274877906944,\) \(1,099,511,627,776 bytes\) but holds 64 bytes"),
            (Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=b""), "is not a .npy array"),
            (npy(shape, payload=bytes(4)), r"declares float32 .* but holds 4 bytes"),
            (npy(shape, descr=">f4", payload=bytes(4 * size)), r"has dtype .*, not a plain number type"),
            (npy((size,), payload=bytes(4 * size)), r"is float32 \(\d+,\), the federation's is float32"),
            (pickled, r"has dtype .*, not a plain number type"),
            (Array(dtype="float32", shape=shape, stype="torch.raw", data=b"\0" * 8), "is not a NumPy array")):
        with pytest.raises(TCURLoRAError, match=f"site W: tensor {re.escape(first)} " + expected):
            accept_update(manifest, state, reply(manifest, state, arrays={first: array}), node=7)


def test_a_site_manifest_with_a_catastrophic_pattern_is_refused(reference):
    from tcurlora.federated.server import accept_update

    manifest, state = reference
    hostile = json.loads(json.dumps(manifest))
    hostile["method"]["config"]["train_modules"] = [CATASTROPHIC]
    with pytest.raises(TCURLoRAError, match="site W: adapter config 'train_modules': .*nests repetitions"):
        accept_update(manifest, state, reply(hostile, state), node=7)


# ----------------------------------------------------------------------------------------------------------
# what a site accepts from the server


def test_site_refuses_a_catastrophic_pattern_before_training(tmp_path, tiny_unet):
    """The training settings arrive in the server's message; the site checks them as a job file's and an
    adapter file's (the same regex check), before it loads the base or compiles anything."""
    from tcurlora.federated import to_record
    from tcurlora.federated.checks import check_train_settings
    from tcurlora.federated.client_app import train

    settings = {"method": "tcurlora", "rank": 2, "preset": "auto", "train_modules": [CATASTROPHIC], "steps": 2,
                "lr": None, "batch_size": 1, "patch_size": None, "labels": None}
    with pytest.raises(TCURLoRAError, match=r"train_modules: regular expression .* nests repetitions"):
        check_train_settings(settings, "the server's training settings")
    for bad, expected in (({**settings, "train_modules": ["ok"], "batch_size": 0}, "batch_size: must be"),
                          ({**settings, "train_modules": ["ok"], "method": "lora"}, "LoRA adapters cannot be averaged"),
                          ({**settings, "extra": 1}, "must be exactly")):
        with pytest.raises(TCURLoRAError, match=expected):
            check_train_settings(bad, "the server's training settings")

    status = tmp_path / "status.json"
    node = {"base": str(tiny_unet.spec), "weights": str(tiny_unet.weights), "device": "cpu", "fold": -1,
            "cases": json.dumps([[str(CT), str(CT_VERT)]]), "out": str(tmp_path / "site.safetensors"), "site": "A",
            "seed": 0, "events": "", "status": str(status)}
    # the identity Flower's flwr-clientapp process sets from its task before it builds the message
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    try:
        message = Message(RecordDict({"global": to_record({"x": torch.zeros(2)}), "config": ConfigRecord({
            "round": 1, "rounds": 1, "fingerprint": "sha256:0", "train": json.dumps(settings)})}), 1,
            MessageType.TRAIN)
        context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        started = time.monotonic()
        with pytest.raises(TCURLoRAError, match="nests repetitions"):
            train(message, context)
    finally:
        TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None
    assert time.monotonic() - started < 30  # refused, not matched against the network's module names
    assert "nests repetitions" in json.loads(status.read_text())["error"]
    assert not list(tmp_path.glob("site.round*"))


# ----------------------------------------------------------------------------------------------------------
# what the server refuses at start, before anything is written or started


def test_server_flags_are_the_protocols(tiny_unet, tmp_path):
    """The server's training flags are the job settings' (the protocol's types, ranges and messages)."""
    proc = subprocess.run(cli_subprocess("federated", "server", *tiny_unet.args, "--insecure", "--batch-size", "0",
                                         "--out", tmp_path / "out" / "g.safetensors"),
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert assert_one_line_error(proc) == "error: --batch-size: must be an integer from 1 to 64, got 0"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings, given, expected", [
    ({"method": "lora"}, {}, "LoRA adapters cannot be averaged exactly"),
    ({"train_modules": [CATASTROPHIC]}, {}, "train_modules: regular expression '(.*.*.*.*)*X' nests repetitions"),
    ({}, {}, "give --site-keys SITE.pub"),
    ({}, {"insecure": True, "site_keys": ["A.pub"]}, "--site-keys needs TLS"),
])
def test_server_refuses_bad_settings_at_start(tiny_base, tmp_path, settings, given, expected):
    from tcurlora.events import Events
    from tcurlora.federated.server import run_server
    from tcurlora.federated.tls import generate_certificates
    from tcurlora.train import FinetuneOptions

    call = {"tls_dir": str(generate_certificates(tmp_path / "certs")), "insecure": False, **given}
    with pytest.raises(TCURLoRAError, match=re.escape(expected)):
        run_server(tiny_base, FinetuneOptions(device="cpu", **settings), labels=None, address="127.0.0.1:1",
                   rounds=1, min_clients=1, out=tmp_path / "out" / "g.safetensors", events=Events(), **call)
    assert not (tmp_path / "out").exists()  # refused before anything was written or started


def test_site_keys(tmp_path, capsys):
    """`tcurlora federated keys`: a private key only its owner reads and a .pub the server lists; the server's
    list refuses what is not a site key, a bad name and a site listed twice."""
    from tcurlora.federated.keys import check_private_key, site_public_keys

    assert cli.main(["federated", "keys", "--out", str(tmp_path / "keys"), "--site", "hospital-a"]) == 0
    private, public = tmp_path / "keys" / "hospital-a.key", tmp_path / "keys" / "hospital-a.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    assert check_private_key(private) == private
    assert site_public_keys([tmp_path / "keys"]) == {"hospital-a": public}
    capsys.readouterr()
    for args, expected in ((["--out", str(tmp_path / "keys"), "--site", "hospital-a"],
                            "hospital-a.key: already exists"),
                           (["--out", str(tmp_path / "k2"), "--site", "a/b"], "--site: site name 'a/b' is not a plain")):
        assert cli.main(["federated", "keys", *args]) == 2
        assert capsys.readouterr().err.startswith(f"error: {expected}")
    assert not (tmp_path / "k2").exists()
    (tmp_path / "x y.pub").write_bytes(public.read_bytes())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "hospital-a.pub").write_bytes(public.read_bytes())
    (tmp_path / "cert.pub").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    for paths, expected in (([tmp_path / "x y.pub"], "x y.pub: site name 'x y' is not a plain name"),
                            ([tmp_path / "keys", tmp_path / "other"], "site hospital-a is listed twice"),
                            ([tmp_path / "cert.pub"], "cert.pub: not an OpenSSH ECDSA public key"),
                            ([tmp_path / "k2"], "k2: no such site key file or folder")):
        with pytest.raises(TCURLoRAError, match=expected):
            site_public_keys(paths)
    with pytest.raises(TCURLoRAError, match="hospital-a.pub: not an unencrypted OpenSSH ECDSA private key"):
        check_private_key(public)


def test_site_refuses_to_start_without_its_key(tiny_unet, tmp_path):
    from tcurlora.events import Events
    from tcurlora.federated.client import run_client
    from tcurlora.federated.tls import generate_certificates

    ca = generate_certificates(tmp_path / "certs") / "ca.crt"
    call = dict(base=str(tiny_unet.spec), weights=str(tiny_unet.weights), server="127.0.0.1:1",
                out=tmp_path / "out" / "s.safetensors", seed=0, device="cpu", site="A", events=Events())
    for given, expected in (({"root_cert": ca, "insecure": False}, "give --key SITE.key"),
                            ({"root_cert": None, "insecure": True, "key": ca}, "--key needs TLS"),
                            ({"root_cert": ca, "insecure": False, "key": ca}, "ca.crt: not an unencrypted OpenSSH")):
        with pytest.raises(TCURLoRAError, match=re.escape(expected)):
            run_client([(str(CT), str(CT_VERT))], **call, **given)
    with pytest.raises(TCURLoRAError, match=r"--site: site name 'a b' is not a plain name"):
        run_client([(str(CT), str(CT_VERT))], **{**call, "site": "a b"}, root_cert=ca, insecure=False, key=ca)
    assert not (tmp_path / "out").exists()
