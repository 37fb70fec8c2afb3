"""Federated fine-tuning on Flower: a server and three listed sites as separate processes on loopback, over TLS.

`tcurlora federated server` starts Flower's SuperLink (on loopback, with SuperNode authentication), registers
the sites' keys, opens the Fleet-only gateway and submits the Flower App with `flwr run`; each `tcurlora
federated client` starts a Flower SuperNode and the site's pinned app launcher (real processes:
flower-superlink, flower-supernode, flwr, and the flwr-serverapp / flwr-clientapp processes they start).

Site A holds the tptbox CT crop and the MRI crop (2 cases), site B the MRI crop (1 case).  The tiny base is a
random-weight plumbing model with the labels L2-L4; the MRI crop's three vertebrae (C5-C7) are relabelled to its
three values.  The sites train the cores and, fully, the last decoder block, so both kinds of tensors are
averaged.  Each round the global adapter the server writes must be the case-weighted mean (2:1) of the two
adapters the sites trained that round, and each site must end with the last global adapter.  Site H is listed
too but forges its updates (federated_hostile_site.py): it must be dropped every round, the rounds completing
without it.  While the federation runs, outsiders with the address and ca.crt try a `flwr run` of their own
app, a SuperNode with an unlisted key and one with no key: all are refused.
"""

import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tcurlora import protocol
from tcurlora.aggregate import read_adapter
from tcurlora.errors import TCURLoRAError
from tcurlora.federated.processes import flower_command, free_port
from conftest import CT, CT_VERT, MRI, MRI_VERT, SUBPROCESS_ENV, VERTEBRAE, assert_one_line_error, cli_subprocess, \
    read_events
from federated_processes import flower_home, interrupt, start_group, stop_group, stranger_app, wait_port

import flwr  # noqa: F401  (a test dependency: missing, these tests must fail, not skip)

DECODER_BLOCK = r"model\.2(\..*)?"
ROUNDS = 2
HOSTILE_SITE = Path(__file__).with_name("federated_hostile_site.py")

def outsiders(folder: Path, port: int, tiny_unet) -> dict:
    """While the federation runs, from outside with only the address and ca.crt: a stranger's `flwr run`, a
    site whose key is not on the server's list, and a SuperNode with no key at all."""
    address, ca = f"127.0.0.1:{port}", folder / "certs" / "ca.crt"
    run = subprocess.run([flower_command("flwr"), "run", stranger_app(folder / "stranger_app"), "x", "--run-config",
                          f'out="{folder / "stranger_result.json"}"'],
                         env=flower_home(folder / "stranger_home", address, ca), capture_output=True, text=True,
                         timeout=120)
    unlisted = subprocess.run(cli_subprocess(
        "federated", "client", *tiny_unet.args, "--server", address, "--root-cert", ca,
        "--key", folder / "stranger_keys" / "stranger.key", "--image", CT, "--label", CT_VERT,
        "--out", folder / "stranger.safetensors"), env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    keyless = subprocess.run([flower_command("flower-supernode"), "--superlink", address, "--root-certificates", ca,
                              "--isolation", "process", "--port", str(free_port()), "--max-wait-time", "30"],
                             env=dict(SUBPROCESS_ENV, FLWR_HOME=str(folder / "stranger_home")), capture_output=True,
                             text=True, timeout=120)
    # Control API calls written by hand, through the Fleet prefix
    sneaked = {path: tls_post(port, ca, path) for path in ("/v1/control/list-runs", "/v1/fleet/../control/list-runs",
                                                         "/v1/fleet/%2e%2e/control/list-runs", "/v1/runtime/get-nodes")}
    return {"run": [run.returncode, run.stdout + run.stderr], "unlisted": [unlisted.returncode, unlisted.stderr],
            "keyless": [keyless.returncode, keyless.stdout + keyless.stderr], "sneaked": sneaked}


def tls_post(port: int, ca, path: str) -> str:
    """The status line the server's port answers to an empty POST of ``path`` (sent as written)."""
    context = ssl.create_default_context(cafile=os.fspath(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
                        "Connection: close\r\n\r\n".encode())
            return tls.recv(4096).decode("latin-1").split("\r\n")[0]


@pytest.fixture(scope="module")
def federation(tiny_unet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("federation")
    certs = folder / "certs"
    subprocess.run(cli_subprocess("federated", "certs", "--out", certs, "--host", "127.0.0.1"), check=True,
                   env=SUBPROCESS_ENV, capture_output=True)
    for keys, site in (("keys", "A"), ("keys", "B"), ("keys", "H"), ("stranger_keys", "stranger")):
        subprocess.run(cli_subprocess("federated", "keys", "--out", folder / keys, "--site", site), check=True,
                       env=SUBPROCESS_ENV, capture_output=True)
    mri_label = folder / "mri_vert_as_L2-L4.nii.gz"
    label = sitk.ReadImage(str(MRI_VERT))
    values = sitk.GetArrayFromImage(label)
    relabelled = sitk.GetImageFromArray(np.select([values == 5, values == 6, values == 7], [21, 22, 23], 0).astype(np.uint8))
    relabelled.CopyInformation(label)
    sitk.WriteImage(relabelled, str(mri_label))
    port = free_port()
    address = f"127.0.0.1:{port}"
    home = folder / "home"  # Flower must keep its state in the launchers' own folders, not in ~/.flwr
    home.mkdir()
    env = dict(SUBPROCESS_ENV, HOME=str(home))
    env.pop("FLWR_HOME", None)
    # no --batch-size: the sites must train with the protocol's default
    server = subprocess.Popen(cli_subprocess(
        "federated", "server", *tiny_unet.args, "--address", address, "--rounds", str(ROUNDS), "--local-steps", "2",
        "--min-clients", "3", "--rank", "2", "--train-modules", DECODER_BLOCK, "--tls-dir", certs,
        "--site-keys", folder / "keys", "--out", folder / "global.safetensors", "--events", folder / "server.jsonl"),
        env=env, stdout=(folder / "server.log").open("w"), stderr=subprocess.STDOUT)
    sites = {"A": [CT, CT_VERT, MRI, mri_label], "B": [MRI, mri_label]}
    clients = {}
    for name, files in sites.items():
        cases = [a for image, label in zip(files[::2], files[1::2]) for a in ("--image", image, "--label", label)]
        clients[name] = subprocess.Popen(cli_subprocess(
            "federated", "client", *tiny_unet.args, "--server", address, "--root-cert", certs / "ca.crt",
            "--key", folder / "keys" / f"{name}.key", *cases, "--site", name,
            "--out", folder / f"site{name}.safetensors", "--events", folder / f"site{name}.jsonl"),
            env=env, stdout=(folder / f"site{name}.log").open("w"), stderr=subprocess.STDOUT)
    # site H is on the server's list but runs modified software that forges its updates
    runtime = free_port()
    hostile_env = dict(env, FLWR_HOME=str(folder / "hostile_home"))
    hostile = [start_group([flower_command("flower-supernode"), "--superlink", address, "--root-certificates",
                            certs / "ca.crt", "--auth-supernode-private-key", folder / "keys" / "H.key",
                            "--isolation", "process", "--port", str(runtime), "--max-wait-time", "300"],
                           hostile_env, folder / "hostile_supernode.log"),
               start_group([sys.executable, HOSTILE_SITE, f"127.0.0.1:{runtime}", folder / "global.round0.safetensors"],
                           hostile_env, folder / "hostile_site.log")]
    procs = {"server": server, **clients}
    try:
        wait_port(port, procs.values())
        (folder / "wire.json").write_text(json.dumps(probe_tls(port, certs / "ca.crt")))
        (folder / "outsiders.json").write_text(json.dumps(outsiders(folder, port, tiny_unet)))
        for p in procs.values():
            p.wait(timeout=600)
    finally:
        for p in procs.values():
            interrupt(p)
        for p in hostile:
            stop_group(p)
    for name, p in procs.items():
        log = (folder / f"{'site' if name != 'server' else ''}{name}.log").read_text(errors="replace")
        assert p.returncode == 0, (name, log[-3000:])
    assert not (home / ".flwr").exists()
    return folder


def probe_tls(port: int, ca) -> dict:
    """While the federation runs: does the server's port answer plain HTTP, and does it complete a TLS
    handshake whose certificate the federation's CA verifies?"""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            plain = s.recv(64)
        except OSError:
            plain = b""
    context = ssl.create_default_context(cafile=os.fspath(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            version = tls.version()
    return {"plain_http_answer": plain.decode("latin-1"), "tls_version": version}


def test_global_adapter_is_weighted_mean_of_sites_each_round(federation):
    previous = None
    for r in range(1, ROUNDS + 1):
        manifest, merged = read_adapter(federation / f"global.round{r}.safetensors")
        _, a = read_adapter(federation / f"siteA.round{r}.safetensors")
        _, b = read_adapter(federation / f"siteB.round{r}.safetensors")
        assert set(merged) == set(a) == set(b)
        assert any(k.startswith("stacks.") for k in merged) and any(k.startswith("trained.") for k in merged)
        for key in merged:
            torch.testing.assert_close(merged[key], (2 * a[key] + b[key]) / 3, rtol=1e-6, atol=1e-7)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4  # the sites really differ
        assert sorted((s["adapter"], s["weight"]) for s in manifest["provenance"]["aggregated_from"]) == [("A", 2), ("B", 1)]
        assert manifest["provenance"]["federated_rounds"] == r and manifest["provenance"]["cases"] == 3
        if previous is not None:  # round 2 trained on from round 1's global state
            assert max(float((merged[k] - previous[k]).abs().max()) for k in merged) > 1e-5
        previous = merged
    # the final global adapter: the server's output and each site's result
    _, final = read_adapter(federation / "global.safetensors")
    for out in ("global.safetensors", "siteA.safetensors", "siteB.safetensors"):
        manifest, tensors = read_adapter(federation / out)
        assert all(torch.equal(tensors[k], previous[k]) for k in previous), out
        assert manifest["labels"] == VERTEBRAE


def test_server_reports_rounds_and_bytes(federation):
    events = read_events(federation / "server.jsonl")
    logs = [e["message"] for e in events if e["event"] == "log"]
    assert any("(TLS)" in m and "bytes per site each way per round" in m for m in logs), logs
    # the ServerApp (in Flower's flwr-serverapp process) logged each round into the same events file
    assert sum("averaged 2 site(s) (A x2 (67%), B x1 (33%))" in m or "averaged 2 site(s) (B x1 (33%), A x2 (67%))" in m
               for m in logs) == 2
    result = [e for e in events if e["event"] == "result"][-1]
    rounds = result["metrics"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    _, state = read_adapter(federation / "global.safetensors")
    data = sum(t.numel() * 4 for t in state.values())
    assert all(r["bytes_per_site_each_way"] == data for r in rounds)
    # Flower's ArrayRecord: the same data as .npy bytes, plus a header per tensor
    assert all(data < r["record_bytes_per_site_each_way"] <= data + 200 * len(state) for r in rounds)
    # the only warnings: hostile site H dropped, once per round (test_hostile_site_is_dropped_each_round)
    assert [e["message"][:len("round 1: dropped site H")] for e in events if e["event"] in ("warning", "error")] \
        == ["round 1: dropped site H", "round 2: dropped site H"]
    for site in "AB":
        site_logs = [e["message"] for e in read_events(federation / f"site{site}.jsonl") if e["event"] == "log"]
        assert sum(m.startswith("round ") and "training on" in m for m in site_logs) == 2, site_logs


def test_sites_train_with_the_protocols_defaults(federation):
    result = [e for e in read_events(federation / "server.jsonl") if e["event"] == "result"][-1]
    train = result["metrics"]["train"]
    assert train["batch_size"] == protocol.default("batch_size") == 1  # the server was given no --batch-size
    assert (train["rank"], train["steps"], train["train_modules"]) == (2, 2, [DECODER_BLOCK])


def test_outsiders_are_refused(federation):
    """From outside, with the server's address and the public ca.crt only."""
    outsiders = json.loads((federation / "outsiders.json").read_text())
    status, output = outsiders["run"]  # a stranger's `flwr run` of their own app
    assert status != 0 and "404 Not Found" in output and "/v1/control/start-run" in output, output
    assert not (federation / "stranger_result.json").exists()
    assert not list(federation.rglob("STRANGER-CODE-RAN"))
    status, stderr = outsiders["unlisted"]  # `tcurlora federated client` with a key not on the server's list
    assert status == 2 and stderr.strip().splitlines()[-1].startswith("error: "), stderr[-2000:]
    assert "this site's key not on the server's list" in stderr.strip().splitlines()[-1]
    assert "Failed to activate SuperNode" in stderr  # Flower's node authentication refused it
    # no path leads from the port to the Control or Runtime API
    assert set(outsiders["sneaked"].values()) == {"HTTP/1.1 404 Not Found"}, outsiders["sneaked"]
    status, output = outsiders["keyless"]  # a bare Flower SuperNode without a key
    assert status != 0 and "All SuperNodes must be registered" in output, output[-2000:]
    # neither ever took part
    result = [e for e in read_events(federation / "server.jsonl") if e["event"] == "result"][-1]
    assert all(len(r["sites"]) + len(r["dropped"]) == 3 for r in result["metrics"]["rounds"])


def test_hostile_site_is_dropped_each_round(federation):
    """Site H is listed but forges its updates (federated_hostile_site.py): a .npy header declaring 1 TB and
    2**63-1 cases in round 1, a site name carrying a forged log line and an empty .npy record in round 2. It is
    dropped with the reason, and both rounds complete with A and B (the weighted-mean test checks their
    arithmetic)."""
    events = read_events(federation / "server.jsonl")
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert "round 1: dropped site H: tensor " in warnings[0]
    assert "declares float32 (274877906944,) (1,099,511,627,776 bytes) but holds 64 bytes" in warnings[0]
    assert warnings[1].startswith("round 2: dropped site H: site name 'H\\nround 2/2: averaged") \
        and "is not a plain name" in warnings[1]
    assert all("\n" not in m for m in warnings)
    rounds = [e for e in events if e["event"] == "result"][-1]["metrics"]["rounds"]
    assert [sorted(r["sites"]) for r in rounds] == [["A", "B"], ["A", "B"]]
    assert [[d["reason"] for d in r["dropped"]] for r in rounds] == [[w[len("round 1: dropped "):]]
                                                                     for w in warnings]
    # no forged line reached the log
    assert not [e for e in events if e.get("message", "").startswith("round 2/2: averaged 1 site(s) (H")]


def test_federation_speaks_only_tls(federation):
    wire = json.loads((federation / "wire.json").read_text())
    assert wire["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert not wire["plain_http_answer"].startswith("HTTP/"), wire  # no plaintext service on the port


def test_server_refuses_updates_of_another_base_or_layout(tmp_path):
    from monai.networks.nets import UNet

    from tcurlora.adapter import inject_adapter
    from tcurlora.adapter_file import save_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.federated.server import check_update

    def adapter(name, seed=0, rank=2):
        torch.manual_seed(seed)
        model = UNet(3, 1, 2, (4, 8, 8), (2, 2), num_res_units=0)
        inject_adapter(model, TCURLoRAConfig(rank=rank))
        save_adapter(model, tmp_path / name)
        return read_adapter(tmp_path / name)

    reference, state = adapter("ref.safetensors")
    other_base, other_state = adapter("other.safetensors", seed=1)
    with pytest.raises(TCURLoRAError, match="site X: trained on another base model"):
        check_update(reference, state, json.dumps(other_base), other_state, "site X")
    other_rank, rank_state = adapter("rank.safetensors", rank=3)
    with pytest.raises(TCURLoRAError, match="site Y: adapter layout differs: config rank 3 instead of 2"):
        check_update(reference, state, json.dumps(other_rank), rank_state, "site Y")
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    with pytest.raises(TCURLoRAError, match="non-finite"):
        check_update(reference, state, json.dumps(reference), poisoned, "site Z")
    check_update(reference, state, json.dumps(reference), state, "site W")  # the same layout passes

    # the same checks on replies as the ServerApp receives them (Flower records built by the ClientApp's code)
    from tcurlora.federated.client_app import site_update
    from tcurlora.federated.server import accept_update

    site, update, _, cases = accept_update(reference, state, site_update(reference, state, 3, "W"), node=7)
    assert (site, cases) == ("W", 3) and all(torch.equal(update[k], state[k]) for k in state)
    with pytest.raises(TCURLoRAError, match="site X: trained on another base model"):
        accept_update(reference, state, site_update(other_base, other_state, 3, "X"), node=7)
    with pytest.raises(TCURLoRAError, match="site Y: sent other adapter tensors"):
        accept_update(reference, state, site_update(reference, {f"x{k}": v for k, v in state.items()}, 3, "Y"),
                      node=7)
    with pytest.raises(TCURLoRAError, match="site Y: adapter layout differs: config rank 3 instead of 2"):
        accept_update(reference, state, site_update(other_rank, {k: rank_state[k] for k in state}, 3, "Y"), node=7)
    with pytest.raises(TCURLoRAError, match="site V: reports no training cases"):
        accept_update(reference, state, site_update(reference, state, 0, "V"), node=7)
    from flwr.app import RecordDict

    with pytest.raises(TCURLoRAError, match=r"site \(node 7\): the reply is not an adapter update"):
        accept_update(reference, state, RecordDict(), node=7)


def test_tls_is_the_default(tiny_unet, tmp_path):
    server = subprocess.run(cli_subprocess("federated", "server", *tiny_unet.args, "--out", tmp_path / "g.safetensors"),
                            env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert "--tls-dir" in assert_one_line_error(server)
    client = subprocess.run(cli_subprocess("federated", "client", *tiny_unet.args, "--server", "127.0.0.1:1",
                                           "--image", CT, "--label", CT_VERT, "--out", tmp_path / "s.safetensors"),
                            env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert "--root-cert" in assert_one_line_error(client)
    assert not list(tmp_path.iterdir())  # refused before anything was written or started


def test_server_certificate_must_name_loopback(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tcurlora.federated.tls import generate_certificates, server_certificate_files

    ok = generate_certificates(tmp_path / "ok", ["fl.example.org"])  # loopback is added to the host asked for
    assert set(server_certificate_files(ok)) == {"ca", "cert", "key"}
    # a hospital-issued certificate naming only the public host name is refused with one clear line
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl.example.org")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("fl.example.org")]), critical=False)
            .sign(key, hashes.SHA256()))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("ca.crt", "server.key"):
        (bad / f).write_bytes((ok / f).read_bytes())
    (bad / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(TCURLoRAError, match="server.pem: the certificate must also name 127.0.0.1"):
        server_certificate_files(bad)


def test_round_files_keep_the_whole_output_name(tmp_path):
    from tcurlora.federated import round_path

    assert round_path(tmp_path / "global.safetensors", 2) == tmp_path / "global.round2.safetensors"
    # two outputs in one folder that differ after the first dot keep apart round files
    v1, v2 = (round_path(tmp_path / f"site.v{i}.safetensors", 1) for i in (1, 2))
    assert (v1.name, v2.name) == ("site.v1.round1.safetensors", "site.v2.round1.safetensors")
