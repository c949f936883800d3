"""A client's claimed name (`modelyard.rpc.client_name`): set as the head of the user-agent,
read back only in the `modelyard-<name>` form, never anything that could pass for a principal."""

from __future__ import annotations

import pytest

from modelyard.rpc.client_name import USER_AGENT_OPTION, claimed_name, user_agent_options


def test_the_option_puts_the_name_at_the_head_of_the_user_agent() -> None:
    assert user_agent_options("load-test") == ((USER_AGENT_OPTION, "modelyard-load-test"),)
    assert user_agent_options(None) == () == user_agent_options("")
    with pytest.raises(ValueError, match="client name"):
        user_agent_options("service:monitor")


@pytest.mark.parametrize(
    ("user_agent", "name"),
    [
        ("modelyard-monitor grpc-python-asyncio/1.85.1 grpc-c/58.0.0 (linux; chttp2)", "monitor"),
        (b"modelyard-demo/0.1.0 grpc-python/1.85.1", "demo"),
        ("grpc-python-asyncio/1.85.1 grpc-c/58.0.0 (linux; chttp2)", None),
        ("grpcurl/1.9 modelyard-monitor", None),  # only the first product counts
        ("modelyard-Service:monitor grpc-c/58", None),
        ("modelyard- grpc-c/58", None),
        ("modelyard-" + "x" * 40, None),
        ("", None),
    ],
)
def test_only_a_well_formed_first_product_is_a_claim(user_agent: str | bytes, name: str | None) -> None:
    assert claimed_name((("x-request-id", "r1"), ("user-agent", user_agent))) == name


def test_no_user_agent_no_claim() -> None:
    assert claimed_name(None) is None and claimed_name((("authorization", "Bearer x"),)) is None
