"""fedpeft.running.deploy without processes: certificates, the connection file, early config errors,
and the probe's rebuilding of a message from its objects."""

import json
import ssl
import subprocess

import numpy as np
import pytest
import tomllib
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.config import ConfigError
from fedpeft.running import deploy
from fedpeft.running.deploy_probe import FleetProbe, _tree_ids, compare_traffic, rebuild_message
from fedpeft.wire import message_size, to_record


def _handshake(certs: deploy.Certificates, server_hostname: str) -> None:
    """A TLS handshake in memory: our server certificate against a client trusting only our CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))  # hostname check on
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_certificates_verify_for_loopback_names(tmp_path, host):
    certs = deploy.make_certificates(tmp_path)
    _handshake(certs, host)
    assert certs.server_key.stat().st_mode & 0o077 == 0


def test_certificates_do_not_verify_for_another_name(tmp_path):
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(deploy.make_certificates(tmp_path), "example.org")


def test_connection_file_insecure_and_tls(tmp_path):
    path = deploy.write_connection(tmp_path / "home", "127.0.0.1:9092", None)
    assert tomllib.loads(path.read_text()) == {
        "superlink": {deploy.CONNECTION: {"address": "127.0.0.1:9092", "insecure": True}}
    }
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    tls = tomllib.loads(deploy.write_connection(tmp_path / "home", "127.0.0.1:9092", ca).read_text())
    assert tls["superlink"][deploy.CONNECTION] == {
        "address": "127.0.0.1:9092",
        "root-certificates": str(ca.resolve()),
    }


@pytest.fixture
def no_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize(
    ("overrides", "supernodes", "match"),
    [({"no-such-key": 1}, None, "no-such-key"), ({"num-clients": 3}, 2, "num-clients=3")],
)
def test_bad_config_fails_before_any_process(no_processes, tmp_path, overrides, supernodes, match):
    with pytest.raises(ConfigError, match=match):
        deploy.deploy(overrides | {"results-dir": str(tmp_path)}, supernodes=supernodes, work_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_free_port_is_on_loopback():
    port = deploy.free_port()
    assert 0 < port < 65536


def test_probe_rebuilds_a_message_with_our_exact_size(tmp_path):
    """Objects as Flower sends them (content-addressed) rebuild a message of the size we meter."""
    content = RecordDict(
        {
            "arrays": to_record({"a": np.arange(6, dtype=np.float32), "b": np.zeros(4, np.float32)}),
            "config": ConfigRecord({"seed": 3}),
        }
    )
    if TaskIdentity._run_id is None:  # Message() needs a run identity outside Flower's runtime
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    msg = Message(content, 7, "train", group_id="1")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    tree = get_object_tree(msg)
    assert set(_tree_ids(tree)) == objects.keys()
    rebuilt = rebuild_message(msg.object_id, objects, msg.metadata.message_id)
    assert message_size(rebuilt) == message_size(msg)

    probe = FleetProbe(tmp_path / "p.jsonl", partition_id=0)
    probe._open("down", msg.metadata, tree, set(objects))
    for oid, data in objects.items():
        probe._arrived(oid, data)
    (tmp_path / "run").mkdir()
    client = {"partition_id": 0, "bytes_down": message_size(msg), "bytes_up": 0}
    (tmp_path / "run" / "rounds.jsonl").write_text(json.dumps({"round": 1, "clients": [client]}) + "\n")
    report = compare_traffic(tmp_path / "run", [tmp_path / "p.jsonl"])
    assert report.exact and report.messages == 1
    assert report.object_bytes == sum(map(len, objects.values()))
