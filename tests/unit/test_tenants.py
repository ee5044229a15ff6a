"""API keys -> tenants: keys file parsing, authentication, metadata, cache salts."""
import re

import pytest

from llmesh.services.router.tenants import (ANONYMOUS, CLASSES, TenantConfigError, TenantDirectory, TenantPolicy,
                                     hash_key, key_from_metadata, new_key)

KEY_A1, KEY_A2, KEY_B, KEY_C = new_key(), new_key(), new_key(), new_key()


def _write(tmp_path, text: str):
    p = tmp_path / "keys.yaml"
    p.write_text(text)
    return p


@pytest.fixture
def keys_file(tmp_path):
    return _write(tmp_path, f"""
tenants:
  acme:
    keys: ["{hash_key(KEY_A1)}", "{hash_key(KEY_A2).upper().replace('SHA256:', 'sha256:')}"]
    models: ["default"]
    classes: [interactive, standard]
    default_class: standard
    max_output_tokens: 512
    input_tokens_per_window: 100000
    output_tokens_per_window: 50000
    quota_window_s: 3600
    requests_per_minute: 600
    tokens_per_minute: 200000
    prefix_cache_group: ""
  beta:
    keys: ["{hash_key(KEY_B)}"]
    classes: [batch]
    default_class: batch
    prefix_cache_group: shared
  gamma:
    keys: ["{hash_key(KEY_C)}"]
    prefix_cache_group: shared
""")


def test_hash_key_and_new_key_format():
    k = new_key()
    assert k.startswith("llm-") and len(k) >= 40
    assert new_key() != k
    h = hash_key(k)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", h)
    assert hash_key(k) == h and hash_key(k + "x") != h
    assert hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_load_parses_every_field(keys_file):
    d = TenantDirectory.load(keys_file)
    assert not d.is_open
    assert set(d.tenants) == {"acme", "beta", "gamma"}
    acme = d.tenants["acme"]
    assert acme == TenantPolicy(
        name="acme", models=("default",), classes=("interactive", "standard"), default_class="standard",
        max_output_tokens=512, input_tokens_per_window=100000, output_tokens_per_window=50000,
        quota_window_s=3600.0, requests_per_minute=600.0, tokens_per_minute=200000.0)
    assert acme.may_use_model("default") and not acme.may_use_model("other")
    assert acme.may_use_class("interactive") and not acme.may_use_class("batch")
    gamma = d.tenants["gamma"]   # defaults
    assert gamma.models == ("*",) and gamma.may_use_model("anything")
    assert gamma.classes == CLASSES and gamma.default_class == "standard"
    assert gamma.max_prompt_tokens == 0 and gamma.requests_per_minute == 0.0


def test_authenticate_good_bad_missing(keys_file):
    d = TenantDirectory.load(keys_file)
    assert d.authenticate(KEY_A1).name == "acme"
    assert d.authenticate(KEY_A2).name == "acme"     # stored hash had upper-case hex: normalised
    assert d.authenticate(KEY_B).name == "beta"
    assert d.authenticate(KEY_C).name == "gamma"
    assert d.authenticate(None) is None
    assert d.authenticate("") is None
    assert d.authenticate(new_key()) is None
    assert d.authenticate(KEY_A1 + " ") is None
    assert d.authenticate(KEY_A1[:-1]) is None
    assert d.authenticate(hash_key(KEY_A1)) is None  # the stored hash is not a key


def test_key_of_one_tenant_never_authenticates_as_another(keys_file):
    d = TenantDirectory.load(keys_file)
    owners = {KEY_A1: "acme", KEY_A2: "acme", KEY_B: "beta", KEY_C: "gamma"}
    for key, owner in owners.items():
        for _ in range(3):
            assert d.authenticate(key).name == owner


def test_open_directory_is_anonymous_whatever_is_presented():
    d = TenantDirectory.open()
    assert d.is_open
    for presented in (None, "", KEY_A1, "garbage"):
        assert d.authenticate(presented) is ANONYMOUS
    assert ANONYMOUS.name == "anonymous" and ANONYMOUS.may_use_model("x") and ANONYMOUS.cache_salt == ""
    assert all(ANONYMOUS.may_use_class(c) for c in CLASSES)


def test_cache_salt(keys_file):
    d = TenantDirectory.load(keys_file)
    acme, beta, gamma = d.tenants["acme"], d.tenants["beta"], d.tenants["gamma"]
    assert acme.cache_salt and beta.cache_salt and acme.cache_salt != beta.cache_salt
    assert beta.cache_salt == gamma.cache_salt                  # same prefix_cache_group
    assert acme.cache_salt == TenantPolicy(name="acme").cache_salt   # stable, derived
    # a group named like a tenant does not collide with that tenant's own salt
    assert TenantPolicy(name="x", prefix_cache_group="acme").cache_salt != acme.cache_salt
    assert TenantPolicy(name="a").cache_salt != TenantPolicy(name="b").cache_salt


@pytest.mark.parametrize("metadata, expected", [
    ([("authorization", "Bearer abc")], "abc"),
    ([("authorization", "bearer  abc ")], "abc"),
    ([("Authorization", "BEARER abc")], "abc"),
    ([("x-api-key", "k1")], "k1"),
    ([("X-Api-Key", " k1 ")], "k1"),
    ([("x-api-key", "k1"), ("authorization", "Bearer k2")], "k2"),   # authorization wins
    ([("authorization", "Basic dXNlcjpwdw=="), ("x-api-key", "k1")], "k1"),
    ([("authorization", "Basic dXNlcjpwdw==")], None),
    ([("authorization", "Bearer ")], None),
    ([("authorization", "Bearer")], None),
    ([("x-api-key", "")], None),
    ([("user-agent", "grpc")], None),
    ([("x-api-key-bin", b"\x00")], None),
    ([], None),
    (None, None),
])
def test_key_from_metadata(metadata, expected):
    assert key_from_metadata(metadata) == expected


def test_metadata_key_authenticates(keys_file):
    d = TenantDirectory.load(keys_file)
    assert d.authenticate(key_from_metadata((("authorization", f"Bearer {KEY_B}"),))).name == "beta"


H1, H2 = hash_key("one"), hash_key("two")


@pytest.mark.parametrize("text, needles", [
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n    colour: red\n", ["'t1'", "colour"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n    classes: [standard, urgent]\n", ["'t1'", "urgent"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n    classes: [batch]\n    default_class: standard\n",
     ["'t1'", "default_class", "standard"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n    default_class: vip\n", ["'t1'", "default_class", "vip"]),
    ("tenants:\n  t1:\n    keys: ['sha256:abc']\n", ["'t1'", "keys[0]", "sha256"]),
    ("tenants:\n  t1:\n    keys: ['llm-rawkeypastedhere']\n", ["'t1'", "keys[0]"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n  t2:\n    keys: ['{H2}', '{H1}']\n", ["'t2'", "'t1'"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n    max_output_tokens: -5\n", ["'t1'", "max_output_tokens"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n    requests_per_minute: -1\n", ["'t1'", "requests_per_minute"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n    input_tokens_per_window: 1.5\n", ["'t1'", "input_tokens_per_window"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n    quota_window_s: 0\n", ["'t1'", "quota_window_s"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n    models: []\n", ["'t1'", "models"]),
    ("tenants:\n  t1:\n    models: ['*']\n", ["'t1'", "keys"]),
    (f"tenants:\n  anonymous:\n    keys: ['{H1}']\n", ["'anonymous'", "reserved"]),
    (f"tenants:\n  'bad name':\n    keys: ['{H1}']\n", ["bad name"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\n  t1:\n    keys: ['{H2}']\n", ["t1", "twice"]),
    (f"tenant:\n  t1:\n    keys: ['{H1}']\n", ["tenants"]),
    (f"tenants:\n  t1:\n    keys: ['{H1}']\nextra: 1\n", ["extra"]),
    ("tenants: {}\n", ["tenants"]),
    ("", ["tenants"]),
    ("tenants: [\n", ["YAML"]),
])
def test_bad_files_give_clear_errors(tmp_path, text, needles):
    with pytest.raises(TenantConfigError) as err:
        TenantDirectory.load(_write(tmp_path, text))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    for needle in needles:
        assert needle in msg, msg
    assert "llm-rawkeypastedhere" not in msg     # never echo what may be a raw key


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(TenantConfigError, match="cannot read"):
        TenantDirectory.load(tmp_path / "nope.yaml")


def test_default_class_falls_back_when_standard_not_allowed(tmp_path):
    d = TenantDirectory.load(_write(tmp_path, f"tenants:\n  t1:\n    keys: ['{H1}']\n    classes: [batch]\n"))
    assert d.tenants["t1"].default_class == "batch"


def test_same_key_twice_in_one_tenant_is_fine(tmp_path):
    d = TenantDirectory.load(_write(tmp_path, f"tenants:\n  t1:\n    keys: ['{H1}', '{H1}']\n"))
    assert d.authenticate("one").name == "t1"
