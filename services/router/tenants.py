"""API keys -> tenants, and what each tenant may do. Free of grpc.

A keys file (YAML) lists tenants; each tenant has one or more API keys stored
only as ``sha256:<hex>`` hashes. Keys are high-entropy random tokens made by
``new_key()``, so a plain SHA-256 is the right hash (no salt or KDF needed: a
guess can't be made cheaper than guessing 256 random bits).

Without a keys file the mesh runs open: every request is the ANONYMOUS tenant.

Generate a key and its hash for the keys file:
    python -m llmesh.services.router.tenants new-key
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

CLASSES = ("interactive", "standard", "batch")
ANONYMOUS_NAME = "anonymous"
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Tenant names end up in metric labels, logs and Redis key names: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TenantConfigError(ValueError):
    """A keys file that can't be used; the message names the tenant and field."""


@dataclass(frozen=True)
class TenantPolicy:
    name: str
    models: tuple[str, ...] = ("*",)            # model names this tenant may use; "*" = all
    classes: tuple[str, ...] = CLASSES           # priority classes it may use
    default_class: str = "standard"
    max_prompt_tokens: int = 0                   # per-request caps; 0 = only the model's limit
    max_output_tokens: int = 0
    input_tokens_per_window: int = 0             # quotas; 0 = unlimited
    output_tokens_per_window: int = 0
    quota_window_s: float = 3600.0
    requests_per_minute: float = 0.0             # token-bucket rate limits; 0 = unlimited
    tokens_per_minute: float = 0.0               # counts prompt + max_tokens*n at admission
    prefix_cache_group: str = ""                 # same group = shared cached prefixes; "" = the tenant alone
    log_inputs: bool = True                      # False: dead letters keep no prompt tokens

    def may_use_model(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def may_use_class(self, cls: str) -> bool:
        return cls in self.classes

    @property
    def cache_salt(self) -> str:
        """Salt mixed into prefix-cache block hashes, so tenants never hit each
        other's cached prefixes unless they share a prefix_cache_group. Stable
        across restarts and routers (it is derived, not random)."""
        if self.prefix_cache_group:
            scope = "group:" + self.prefix_cache_group
        elif self.name == ANONYMOUS_NAME:
            return ""
        else:
            scope = "tenant:" + self.name
        return hashlib.sha256(b"llmesh-prefix-cache\x00" + scope.encode()).hexdigest()[:32]


ANONYMOUS = TenantPolicy(name=ANONYMOUS_NAME)   # used when the mesh runs open (no keys file)


def new_key() -> str:
    """A fresh random API key (256 bits of entropy)."""
    return "llm-" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of a key: what the keys file stores."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


_INT_FIELDS = ("max_prompt_tokens", "max_output_tokens", "input_tokens_per_window", "output_tokens_per_window")
_FLOAT_FIELDS = ("requests_per_minute", "tokens_per_minute")
_KNOWN_FIELDS = frozenset(("keys", "models", "classes", "default_class", "quota_window_s", "prefix_cache_group",
                           "log_inputs") + _INT_FIELDS + _FLOAT_FIELDS)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML would
    silently keep the last, e.g. merge two tenants of the same name)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise TenantConfigError(f"keys file: {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _str_list(tenant: str, fieldname: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TenantConfigError(f"tenant {tenant!r}: {fieldname} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _parse_tenant(name: Any, spec: Any) -> tuple[TenantPolicy, list[str]]:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TenantConfigError(f"tenant name {name!r}: use 1-64 characters from letters, digits, '_', '.', '-'")
    if name == ANONYMOUS_NAME:
        raise TenantConfigError(f"tenant {name!r}: the name is reserved for the open (no keys file) mode")
    if not isinstance(spec, dict):
        raise TenantConfigError(f"tenant {name!r}: expected a mapping of fields, got {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in _KNOWN_FIELDS)
    if unknown:
        raise TenantConfigError(f"tenant {name!r}: unknown field(s) {', '.join(unknown)}; "
                                f"known fields: {', '.join(sorted(_KNOWN_FIELDS))}")
    if "keys" not in spec:
        raise TenantConfigError(f"tenant {name!r}: keys is required (a list of 'sha256:<64 hex>' hashes)")
    hashes = []
    for i, h in enumerate(_str_list(name, "keys", spec["keys"])):
        norm = h.strip().lower()
        if not _HASH_RE.match(norm):
            # Don't echo the value: someone may have pasted a raw key here.
            raise TenantConfigError(f"tenant {name!r}: keys[{i}] is not of the form 'sha256:<64 hex digits>' "
                                    "(store hash_key(key), never the key itself)")
        if norm not in hashes:
            hashes.append(norm)

    kwargs: dict[str, Any] = {"name": name}
    if "models" in spec:
        kwargs["models"] = _str_list(name, "models", spec["models"])
        if not kwargs["models"]:
            raise TenantConfigError(f"tenant {name!r}: models is empty (use ['*'] for all models)")
    if "classes" in spec:
        classes = _str_list(name, "classes", spec["classes"])
        if not classes:
            raise TenantConfigError(f"tenant {name!r}: classes is empty; choose from {', '.join(CLASSES)}")
        for c in classes:
            if c not in CLASSES:
                raise TenantConfigError(f"tenant {name!r}: classes has unknown class {c!r}; "
                                        f"choose from {', '.join(CLASSES)}")
        kwargs["classes"] = tuple(dict.fromkeys(classes))
    classes = kwargs.get("classes", CLASSES)
    default_class = spec.get("default_class", "standard" if "standard" in classes else classes[0])
    if default_class not in CLASSES:
        raise TenantConfigError(f"tenant {name!r}: default_class {default_class!r} is not a class; "
                                f"choose from {', '.join(CLASSES)}")
    if default_class not in classes:
        raise TenantConfigError(f"tenant {name!r}: default_class {default_class!r} is not in its classes "
                                f"{list(classes)}")
    kwargs["default_class"] = default_class
    for f in _INT_FIELDS:
        if f in spec:
            v = spec[f]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TenantConfigError(f"tenant {name!r}: {f} must be an integer >= 0 (0 = unlimited), got {v!r}")
            kwargs[f] = v
    for f in _FLOAT_FIELDS:
        if f in spec:
            v = spec[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < float("inf")):
                raise TenantConfigError(f"tenant {name!r}: {f} must be a number >= 0 (0 = unlimited), got {v!r}")
            kwargs[f] = float(v)
    if "quota_window_s" in spec:
        v = spec["quota_window_s"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
            raise TenantConfigError(f"tenant {name!r}: quota_window_s must be a number of seconds > 0, got {v!r}")
        kwargs["quota_window_s"] = float(v)
    if "prefix_cache_group" in spec:
        v = spec["prefix_cache_group"]
        if not isinstance(v, str):
            raise TenantConfigError(f"tenant {name!r}: prefix_cache_group must be a string, got {v!r}")
        kwargs["prefix_cache_group"] = v
    if "log_inputs" in spec:
        if not isinstance(spec["log_inputs"], bool):
            raise TenantConfigError(f"tenant {name!r}: log_inputs must be true or false")
        kwargs["log_inputs"] = spec["log_inputs"]
    return TenantPolicy(**kwargs), hashes


@dataclass
class TenantDirectory:
    is_open: bool
    tenants: dict[str, TenantPolicy] = field(default_factory=dict)
    # (stored hash as bytes, tenant): scanned in full on every authenticate()
    _entries: list[tuple[bytes, TenantPolicy]] = field(default_factory=list, repr=False)

    @classmethod
    def open(cls) -> "TenantDirectory":
        """No keys file: every request is ANONYMOUS."""
        return cls(is_open=True, tenants={ANONYMOUS.name: ANONYMOUS})

    @classmethod
    def load(cls, path: str | Path) -> "TenantDirectory":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise TenantConfigError(f"keys file {path}: cannot read it ({e.strerror or e})") from e
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)
        except TenantConfigError as e:
            raise TenantConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise TenantConfigError(f"keys file {path}: not valid YAML: {e}") from None
        try:
            return cls.from_dict(data)
        except TenantConfigError as e:
            raise TenantConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, data: Any) -> "TenantDirectory":
        if not isinstance(data, dict) or "tenants" not in data:
            raise TenantConfigError("keys file: expected a top-level 'tenants:' mapping")
        extra = sorted(str(k) for k in data if k != "tenants")
        if extra:
            raise TenantConfigError(f"keys file: unknown top-level key(s) {', '.join(extra)}; only 'tenants' is allowed")
        specs = data["tenants"]
        if not isinstance(specs, dict) or not specs:
            raise TenantConfigError("keys file: 'tenants' must be a non-empty mapping of tenant name -> fields")
        tenants: dict[str, TenantPolicy] = {}
        owner: dict[str, str] = {}
        entries: list[tuple[bytes, TenantPolicy]] = []
        for name, spec in specs.items():
            policy, hashes = _parse_tenant(name, spec)
            for h in hashes:
                if h in owner:
                    raise TenantConfigError(f"tenant {name!r}: key {h[:15]}... is also a key of tenant "
                                            f"{owner[h]!r}; a key must belong to one tenant")
                owner[h] = name
                entries.append((h.encode("ascii"), policy))
            tenants[name] = policy
        return cls(is_open=False, tenants=tenants, _entries=entries)

    def authenticate(self, presented_key: str | None) -> TenantPolicy | None:
        """The tenant owning ``presented_key``, ANONYMOUS when open, else None.

        Compares the presented key's hash against every stored hash in constant
        time, without an early exit, so timing reveals neither which nor whether
        a stored hash matched a prefix. The key itself is never logged."""
        if self.is_open:
            return ANONYMOUS
        if not presented_key:
            return None
        presented = hash_key(presented_key).encode("ascii")
        found = None
        for stored, policy in self._entries:
            if hmac.compare_digest(presented, stored):
                found = policy
        return found


def key_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The API key from request metadata: ``authorization: Bearer <key>``
    (scheme case-insensitive) first, else ``x-api-key: <key>``; None when absent."""
    bearer = api_key = None
    for name, value in metadata or ():
        if not isinstance(name, str) or not isinstance(value, str):
            continue
        lname = name.lower()
        if lname == "authorization" and bearer is None:
            scheme, _, rest = value.strip().partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                bearer = rest.strip()
        elif lname == "x-api-key" and api_key is None and value.strip():
            api_key = value.strip()
    return bearer if bearer is not None else api_key


def _main(argv: list[str] | None = None) -> int:
    import sys
    args = sys.argv[1:] if argv is None else argv
    if args != ["new-key"]:
        print("usage: python -m llmesh.services.router.tenants new-key", file=sys.stderr)
        return 2
    key = new_key()
    print(f"key:  {key}\nhash: {hash_key(key)}   # put this in the keys file; give the key to the tenant")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
