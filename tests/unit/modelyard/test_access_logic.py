"""Access control's pure parts: grants, keys and tokens, per-key limits, and the rule table
covering every RPC of every service."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pool

from modelyard.access import (
    KeyBook,
    KeyLimits,
    KeyRecord,
    Principal,
    ServiceTokens,
    hash_token,
    new_key_token,
)
from modelyard.access.grants import MODEL_VERBS, Grant, Grants, InvalidGrant
from modelyard.access.interceptor import check_listen_address
from modelyard.access.keys import key_id_of
from modelyard.access.rules import AUTHENTICATED, INTERNAL, RULES
from modelyard.errors import RateLimited, Unauthenticated
from modelyard.oip import grpc_service_pb2  # noqa: F401 - registers the descriptors
from modelyard.settings import AccessSettings
from modelyard.v1 import (  # noqa: F401 - registers the descriptors
    access_service_pb2,
    inference_service_pb2,
    model_server_service_pb2,
    monitor_service_pb2,
    registry_service_pb2,
)


def test_grants_match_verb_and_model_pattern() -> None:
    grants = Grants.parse(["predict:fraud-*", "metadata:*", "monitor.read"])
    assert grants.allows("predict", "fraud-eu")
    assert not grants.allows("predict", "demo")
    assert not grants.allows("predict", "xfraud-eu")  # anchored at both ends
    assert grants.allows("metadata", "anything")
    assert grants.allows("monitor.read")
    assert not grants.allows("registry.write", "fraud-eu")
    assert not grants.allows("admin")
    admin = Grants.parse(["admin"])
    assert admin.allows("registry.write", "x") and admin.allows("audit.read")


@pytest.mark.parametrize(
    "text", ["predict", "predict:", "predict:Fraud", "predict:a b", "write:*", "admin:demo", "predict:[a]"]
)
def test_bad_grants_are_refused_with_what_to_write(text: str) -> None:
    with pytest.raises(InvalidGrant):
        Grant.parse(text)


def test_a_pattern_is_not_a_regular_expression() -> None:
    assert not Grant("predict", "fraud-*").matches("fraud")  # '*' is any run, '-' literal
    assert Grant("predict", "fraud-*").matches("fraud-")


def _book(**overrides: object) -> tuple[KeyBook, str]:
    key_id, token = new_key_token()
    values: dict[str, object] = {
        "key_id": key_id,
        "name": "ci",
        "token_hash": hash_token(token),
        "grants": ("predict:*",),
        **overrides,
    }
    return KeyBook([KeyRecord(**values)], epoch=1), token  # type: ignore[arg-type]


def test_a_key_authenticates_only_with_its_whole_token() -> None:
    book, token = _book()
    principal = book.authenticate(token)
    assert principal.name == "key:ci" and principal.allows("predict", "demo")
    key_id = key_id_of(token)
    assert key_id is not None
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    for bad in ("", "myk_", "Bearer x", forged, token + "x", "myk_" + key_id + "_" + "a" * 43):
        with pytest.raises(Unauthenticated):
            book.authenticate(bad)


def test_an_expired_key_is_refused_and_says_so() -> None:
    book, token = _book(expires_at=1000.0)
    assert book.authenticate(token, now=999.0).name == "key:ci"
    with pytest.raises(Unauthenticated, match="expired"):
        book.authenticate(token, now=1000.0)


def test_a_key_with_a_grant_this_version_does_not_know_is_refused_not_widened() -> None:
    book, token = _book(grants=("predict:*", "teleport:*"))
    with pytest.raises(Unauthenticated):
        book.authenticate(token)


def test_replacing_the_book_revokes_at_once() -> None:
    book, token = _book()
    book.authenticate(token)
    book.replace([], epoch=2)
    with pytest.raises(Unauthenticated):
        book.authenticate(token)


def test_service_tokens_prove_a_kind_only_with_the_cluster_secret() -> None:
    tokens = ServiceTokens(b"s" * 32)
    principal = tokens.verify(tokens.token("gateway"))
    assert principal is not None and principal.service and principal.name == "service:gateway"
    assert ServiceTokens(b"t" * 32).verify(tokens.token("gateway")) is None
    assert tokens.verify(tokens.token("gateway")[:-2] + "00") is None
    assert tokens.verify("mys_gateway") is None
    with pytest.raises(ValueError):
        ServiceTokens(b"short")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limit_is_per_key_and_says_when_to_retry() -> None:
    clock = _Clock()
    limits = KeyLimits(default_rate_per_s=2.0, clock=clock)
    noisy = Principal(name="key:noisy", key_id="a" * 12)
    quiet = Principal(name="key:quiet", key_id="b" * 12)
    limits.admit(noisy)
    limits.admit(noisy)
    with pytest.raises(RateLimited) as refused:
        limits.admit(noisy)
    assert refused.value.retry_after_s is not None and 0 < refused.value.retry_after_s <= 0.5
    limits.admit(quiet)  # the other key is unaffected
    clock.now += 0.5
    limits.admit(noisy)  # one token back after 1/rate


def test_the_concurrency_limit_counts_calls_in_flight() -> None:
    limits = KeyLimits()
    key = Principal(name="key:k", key_id="c" * 12, max_concurrency=2)
    first, second = limits.admit(key), limits.admit(key)
    assert first is not None and second is not None
    with pytest.raises(RateLimited):
        limits.admit(key)
    first()
    release = limits.admit(key)
    assert release is not None
    assert limits.admit(Principal(name="service:gateway", service=True)) is None  # services unlimited


def test_every_method_of_every_service_has_a_rule() -> None:
    pool = descriptor_pool.Default()
    for kind, services in RULES.items():
        for service, rules in services.items():
            methods = {m.name for m in pool.FindServiceByName(service).methods}
            assert set(rules) == methods, f"{kind} {service}: rules differ from the proto"
            for rule in rules.values():
                if rule.verb not in (AUTHENTICATED, INTERNAL):
                    Grant.parse(f"{rule.verb}:*" if rule.verb in MODEL_VERBS else rule.verb)
    # A model server takes no end user's call at all.
    assert all(r.verb == INTERNAL for rules in RULES["model_server"].values() for r in rules.values())
    assert RULES["registry"]["modelyard.v1.RegistryService"]["DownloadModelVersion"].verb == INTERNAL


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "10.0.0.5", "gateway"])
def test_access_off_refuses_a_reachable_address(host: str) -> None:
    with pytest.raises(RuntimeError, match="access control off"):
        check_listen_address(AccessSettings(mode="off"), host, "gateway")
    check_listen_address(AccessSettings(mode="insecure"), host, "gateway")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_access_off_is_allowed_on_loopback(host: str) -> None:
    check_listen_address(AccessSettings(mode="off"), host, "gateway")
