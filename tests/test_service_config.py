"""Service configuration: sources (file, env, flags) and the validation of every field."""
from __future__ import annotations

import dataclasses
import json

import pytest

from engine.service.config import ServiceConfig, load_config
from engine.service.status import BadRequest

# at least one bad value per field; test_every_field_has_a_bad_value keeps this table complete
BAD = {
    "host": [""], "port": [-1, 65536, "50051"], "data_dir": [""], "allow_remote": ["yes"],
    "tls_cert": [1], "tls_key": [1], "tls_client_ca": [1], "tokens": ["x", [1]], "health_requires_token": [1],
    "workers": [0, 1.5], "max_message_bytes": [100], "max_response_bytes": [0], "max_he_context_bytes": [0],
    "he_shards": [0, 65], "he_decision_ttl_s": [0, float("nan")], "he_snapshot_interval_s": [-1, float("inf")],
    "he_snapshot_batch": [0], "he_snapshot_after_removal": ["no"], "gallery_backend": ["annoy"],
    "allowed_schemes": ["biohash", [""], ["biohash:bits"]], "thresholds": [[], {"biohash": float("inf")}, {"": 0.5}],
    "fallback_methods": [[], [""]], "retention_days": [0, True], "max_retention_days": [0], "purge_interval_s": [0],
    "guardian_age": [0], "filing_threshold": [0], "filing_working_days": [0], "holidays": [["2025-13-01"], "2025-01-01"],
    "verify_fail_limit": [0], "verify_fail_window_s": [0], "verify_lockout_s": [-1], "identify_limit": [0],
    "identify_nomatch_limit": [0], "identify_window_s": [0], "identify_lockout_s": [-1], "request_id_ttl_s": [0],
    # harden
    "audit_key_file": [1], "verify_unknown_limit": [0], "auth_fail_limit": [0], "auth_fail_window_s": [0],
    "auth_lockout_s": [-1],
    # api
    "metrics_port": [-2, 65536, "9464"], "tracing": ["jaeger", 1], "tracing_endpoint": [1], "log_format": ["xml"],
    "access_log": ["yes"], "max_samples_per_subject": [0, 1001],
}
BAD.update({"deployment": ["edge ", "", 1], "records_retention_years": [2, 0, "3"]})   # measures (issue 15)
# pg
BAD.update({"store": [1, "mysql://x", "/tmp/x.db"], "matching": ["ray", "ray://nohost", "ray://h:0", "ray://h:x", 2],
            "ray_shards": [0, 1.5], "ray_namespace": [""], "ray_node_ip": [1], "ray_timeout_s": [0],
            "bulk_batch_rows": [0]})
# keysvc
BAD.update({"keyservice": [1], "keyservice_token": [1], "keyservice_token_file": [1], "keyservice_key": ["zz", 1],
            "keyservice_tls_ca": [1], "keyservice_server_name": [1], "keyservice_timeout_s": [0]})


def test_every_field_has_a_bad_value():
    assert set(BAD) == {f.name for f in dataclasses.fields(ServiceConfig)}


@pytest.mark.parametrize("name,value", [(k, v) for k, vs in BAD.items() for v in vs])
def test_bad_value_is_refused_naming_the_field(name, value):
    with pytest.raises(BadRequest) as ei:
        ServiceConfig(**{name: value}).validate()
    assert ei.value.reason == "BAD_CONFIG" and name in str(ei.value)


def test_defaults_validate():
    assert ServiceConfig().validate().port == 50051


def test_good_values_of_the_structured_fields_validate():
    ServiceConfig(allowed_schemes=["biohash", "iom:m=256,q=16", 'biohash/v1:{"bits":256,"dim":128}'],
                  holidays=["2025-01-07"], thresholds={"biohash": 0.6}, gallery_backend="faiss").validate()


def test_retention_default_cannot_exceed_the_maximum():
    with pytest.raises(BadRequest, match="retention_days <= max_retention_days"):
        ServiceConfig(retention_days=400, max_retention_days=365).validate()


def test_tls_files_go_together():
    with pytest.raises(BadRequest, match="go together"):
        ServiceConfig(tls_cert="c.pem").validate()
    with pytest.raises(BadRequest, match="mTLS"):
        ServiceConfig(tls_client_ca="ca.pem").validate()


def test_config_file_values_are_validated(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"port": "6000"}))
    with pytest.raises(BadRequest) as ei:
        load_config(str(f), env={})
    assert ei.value.reason == "BAD_CONFIG" and "port" in str(ei.value)


def test_env_overrides_file_and_flags_override_env(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"port": 6000, "filing_threshold": 7, "tokens": [{"role": "admin", "sha256": "ab" * 32}]}))
    cfg = load_config(str(f), env={"VEILFACE_PORT": "6001", "VEILFACE_TOKENS": "device:" + "cd" * 32 + ":d1:gate-1"},
                      data_dir=str(tmp_path / "d"), host=None)
    assert cfg.port == 6001 and cfg.filing_threshold == 7 and cfg.data_dir == str(tmp_path / "d")
    assert [(t.role, t.device_id) for t in cfg.token_entries()] == [("admin", ""), ("device", "gate-1")]


def test_public_dict_hides_token_hashes(tmp_path):
    cfg = ServiceConfig(tokens=[{"role": "admin", "sha256": "ab" * 32}]).validate()
    assert "ab" * 32 not in json.dumps(cfg.public_dict())


def test_unknown_keys_are_refused(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"nosuchkey": 1}))
    with pytest.raises(BadRequest):
        load_config(str(f), env={})


def test_toml_file(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('port = 7000\nretention_days = 30\n')
    assert load_config(str(toml), env={}).retention_days == 30
