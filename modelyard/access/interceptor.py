"""The one access check, every service, every RPC: run by the server interceptor
(`modelyard.rpc.interceptors.ObservabilityInterceptor(access=...)`) for each call.

For each call, before any servicer code runs and before the request bytes are parsed:

1. **Who**: an mTLS certificate naming one of the cluster's service kinds, else the bearer
   token in `authorization` metadata: a service token (`mys_...`) checked against the cluster
   secret, or an API key (`myk_...`) looked up in the service's `KeyBook`. No credentials, or
   a malformed, unknown, revoked or expired key: UNAUTHENTICATED.
2. **May they**: the method's `Rule` (modelyard.access.rules). A key without the grant:
   PERMISSION_DENIED naming the grant it needs. The model is read from the parsed request
   (every message of a request stream); a caller without rights on a model gets the same
   answer whether the model exists or not, since nothing has looked it up yet.
3. **How much**: at the gateway, the key's rate and concurrency limits (`KeyLimits`).

The principal is handed on in a context variable (`current_principal()`): the registry
records it as the actor of the audit log, and listings show only what it may see (`visible`).

Usage::

    access = AccessControl.from_settings(settings.access, kind="gateway", book=book)
    create_server(..., access=access)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from modelyard.access.keys import SERVICE_PREFIX, KeyBook, Principal, ServiceTokens
from modelyard.access.limits import KeyLimits
from modelyard.access.rules import (
    AUTHENTICATED,
    INTERNAL,
    OPEN_SERVICES,
    REFLECTION_SERVICES,
    RULES,
    Rule,
)
from modelyard.errors import ModelyardError, PermissionDenied, Unauthenticated
from modelyard.rpc.errors import to_rpc_status
from modelyard.rpc.handlers import behavior_of, factory_of
from modelyard.settings import AccessSettings

__all__ = [
    "AUTHORIZATION_METADATA_KEY",
    "AccessControl",
    "AccessScreen",
    "DeniedCall",
    "current_principal",
    "require",
    "visible",
    "check_listen_address",
]

log = logging.getLogger(__name__)

_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

AUTHORIZATION_METADATA_KEY = "authorization"

_principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)
_denial_var: contextvars.ContextVar[ModelyardError | None] = contextvars.ContextVar("denial", default=None)


class _Pending:
    """A model check left to the handler (`Rule.in_handler`)."""

    __slots__ = ("verb", "checked")

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.checked = False


_pending_var: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar("access_pending", default=None)


def current_principal() -> Principal | None:
    """Who the current call is from; None outside a call or with access control off."""
    return _principal_var.get()


def _lacks(principal: Principal, verb: str, model: str) -> PermissionDenied:
    grant = f"{verb}:{model[:64]}" if model else verb
    return PermissionDenied(
        f"{principal.name[:80]} lacks the grant {grant}",
        metadata={"grant": grant, "principal": principal.name, "model": model[:64]},
    )


def require(verb: str, model: str) -> None:
    """Raise PermissionDenied unless the current caller may `verb` on `model`; for handlers
    that parse their own request bytes (`Rule.in_handler`). A no-op with access control off."""
    principal = _principal_var.get()
    pending = _pending_var.get()
    if pending is not None:
        pending.checked = True
    if principal is not None and not principal.allows(verb, model):
        raise _lacks(principal, verb, model)


def visible(verb: str, model: str) -> bool:
    """Whether a listing may show `model` to the current caller (True with access off)."""
    principal = _principal_var.get()
    return principal is None or principal.allows(verb, model)


@dataclass(frozen=True, slots=True)
class DeniedCall:
    """A refused call to a mutating RPC, for the audit log."""

    method: str
    actor: str
    code: str
    message: str
    model: str = ""


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_address(access: AccessSettings, host: str, what: str) -> None:
    """Refuse to accept remote callers without access control, unless told `insecure`."""
    if access.mode == "off" and not _is_loopback(host):
        raise RuntimeError(
            f"refusing to listen on {host} for {what} with access control off: anyone who can reach"
            " it could call every RPC. Set ACCESS__MODE=enforce (the default), listen on 127.0.0.1,"
            " or set ACCESS__MODE=insecure to accept that"
        )


class AccessControl:
    """A service's access check: its rules, the keys it accepts, the cluster secret.

    Args:
        settings: The service's access settings.
        kind: The service kind, which selects its table in `RULES`.
        book: The keys it accepts (kept current by a `KeySync`, or by the registry itself).
        limits: Per-key limits (the gateway's).
        on_denied: Called for each refused call to a mutating RPC.
    """

    def __init__(
        self,
        settings: AccessSettings,
        *,
        kind: str,
        book: KeyBook | None = None,
        limits: KeyLimits | None = None,
        on_denied: Callable[[DeniedCall], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.kind = kind
        self.book = book if book is not None else KeyBook()
        self.limits = limits
        self.on_denied = on_denied
        secret = settings.secret()
        self.tokens = ServiceTokens(secret) if secret else None

    @property
    def enforced(self) -> bool:
        return self.settings.mode == "enforce"

    def service_token(self) -> str | None:
        """This service's own token for the calls it makes, or None (no cluster secret)."""
        return self.tokens.token(self.kind) if self.tokens is not None else None

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata carrying this service's token, for its outgoing calls."""
        token = self.service_token()
        return ((AUTHORIZATION_METADATA_KEY, f"Bearer {token}"),) if token else ()

    def metrics_authorizer(self) -> Callable[[str | None], bool] | None:
        """The /metrics check (`access.metrics`), or None when /metrics is open."""
        if not self.enforced or self.settings.metrics == "open":
            return None
        interceptor = AccessScreen(self)

        def authorize(header: str | None) -> bool:
            try:
                principal = interceptor.authenticate((("authorization", header),) if header else ())
            except ModelyardError:
                return False
            return principal.allows("monitor.read")

        return authorize

    def screen(self) -> AccessScreen | None:
        """The per-call check for the server interceptor, or None when not enforced."""
        return AccessScreen(self) if self.enforced else None


def _token_from(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION_METADATA_KEY:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token:
                return ""
            return token.strip()
    return None


_NO_KEY = (
    "this call needs credentials: send the metadata 'authorization: Bearer <API key>'"
    " (make a key with `modelyard keys create`)"
)


class AccessScreen:
    """See the module docstring: the check of every call, run inside the one server
    interceptor (`ObservabilityInterceptor(access=...)`): each interceptor layer costs grpc.aio
    a coroutine chain per call. Wrapped handlers are cached per method; the decisions are made
    for every call."""

    def __init__(self, access: AccessControl) -> None:
        self._access = access
        self._rules: Mapping[str, Mapping[str, Rule]] = RULES.get(access.kind, {})
        self._cache: dict[str, tuple[_Handler, _Handler]] = {}
        self._deny_cache: dict[str, tuple[_Handler, _Handler]] = {}
        # token -> (book epoch, principal, expiry): a key's next calls skip parse and hash.
        self._seen: dict[str, tuple[int, Principal, float]] = {}

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        """The principal the call's credentials prove, or raise Unauthenticated."""
        token = _token_from(metadata)
        if token is None:
            raise Unauthenticated(_NO_KEY)
        if not token:
            raise Unauthenticated("the authorization metadata must be 'Bearer <API key>'")
        book = self._access.book
        seen = self._seen.get(token)
        now = time.time()
        if seen is not None and seen[0] == book.epoch and (not seen[2] or now < seen[2]):
            return seen[1]
        if token.startswith(SERVICE_PREFIX):
            tokens = self._access.tokens
            principal = tokens.verify(token) if tokens is not None else None
            if principal is None:
                raise Unauthenticated("the service token is not valid for this cluster")
            return principal
        principal = book.authenticate(token, now)
        if len(self._seen) >= 4096:
            self._seen.clear()
        self._seen[token] = (book.epoch, principal, book.expires_at(principal.key_id))
        return principal

    def screen(
        self, handler: _Handler | None, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        """The handler to run for this call: `handler` itself, a wrapper that checks what
        needs the parsed request, or one that answers the refusal. Called by the
        observability interceptor for every call (one interceptor layer, not two)."""
        if handler is None:
            return None
        method = handler_call_details.method
        service, _, name = method.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return handler
        if service in REFLECTION_SERVICES:
            rule: Rule | None = None if self._access.settings.reflection == "open" else Rule(AUTHENTICATED)
            if rule is None:
                return handler
        else:
            rule = self._rules.get(service, {}).get(name)
        try:
            principal = self.authenticate(handler_call_details.invocation_metadata)
            if rule is None:
                raise PermissionDenied(f"{method[:120]} has no access rule, so nobody may call it")
            if rule.verb == INTERNAL:
                if not principal.service:
                    raise PermissionDenied(
                        f"{method[:120]} is internal to the cluster: only its services may call it,"
                        " never an API key (call the gateway instead)",
                        metadata={"grant": INTERNAL, "principal": principal.name},
                    )
            elif rule.verb != AUTHENTICATED and rule.model is None and not rule.in_handler:
                if not principal.allows(rule.verb):
                    raise _lacks(principal, rule.verb, "")
        except ModelyardError as error:
            _denial_var.set(error)
            denier = self._deny_cache.get(method)
            if denier is None or denier[0] is not handler:
                denier = self._deny_cache[method] = (handler, self._denier(method, handler, rule))
            return denier[1]
        _principal_var.set(principal)
        if rule.verb in (INTERNAL, AUTHENTICATED) or (
            rule.model is None and not rule.in_handler and not rule.limited
        ):
            return handler
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _guard(handler, rule, method, self._access)
        self._cache[method] = (handler, wrapped)
        return wrapped

    def _denier(self, method: str, handler: _Handler, rule: Rule | None) -> _Handler:
        """A handler that answers the denial (read from `_denial_var`) without parsing the
        request: bytes from a caller who is not let in are never decoded. One per method,
        so refused calls never churn the handler caches of the allowed ones."""
        on_denied = self._access.on_denied if rule is not None and rule.mutating else None

        async def deny(context: Any) -> None:
            error = _denial_var.get() or Unauthenticated(_NO_KEY)
            if on_denied is not None:
                await on_denied(
                    DeniedCall(
                        method=method.rpartition("/")[2],
                        actor="anonymous" if isinstance(error, Unauthenticated) else _actor_of(error),
                        code="UNAUTHENTICATED" if isinstance(error, Unauthenticated) else "PERMISSION_DENIED",
                        message=error.message[:256],
                    )
                )
            await context.abort_with_status(to_rpc_status(error))

        streaming_in = handler.request_streaming

        async def first_message(requests: Any) -> None:
            # A refusal sent while the client is still writing its first message reaches it,
            # at times, as grpc's "INTERNAL: Internal error from Core" rather than the status:
            # take that message (unparsed, at most a second's wait) before answering.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await anext(aiter(requests), None)

        if handler.response_streaming:

            async def deny_stream(request: Any, context: Any) -> Any:
                if streaming_in:
                    await first_message(request)
                await deny(context)
                yield  # pragma: no cover - abort raises

            behavior: Any = deny_stream
        else:

            async def deny_unary(request: Any, context: Any) -> Any:
                if streaming_in:
                    await first_message(request)
                await deny(context)

            behavior = deny_unary
        factory = factory_of(handler)
        return factory(behavior, request_deserializer=None, response_serializer=handler.response_serializer)


def _actor_of(error: ModelyardError) -> str:
    return error.metadata.get("principal", "anonymous")


def _guard(handler: _Handler, rule: Rule, method: str, access: AccessControl) -> _Handler:
    """Wrap a handler with the checks that need the parsed request: the model of each
    message, the handler's own check (`in_handler`), and the key's limits."""
    behavior = behavior_of(handler)
    read_model = rule.model
    verb = rule.verb
    limits = access.limits if rule.limited else None

    def check(request: Any) -> None:
        principal = _principal_var.get()
        assert principal is not None
        if read_model is not None:
            model = read_model(request)
            if not principal.allows(verb, model):
                raise _lacks(principal, verb, model)
        elif verb not in (AUTHENTICATED, INTERNAL) and not principal.allows(verb):
            raise _lacks(principal, verb, "")

    on_denied = access.on_denied if rule.mutating else None

    async def refused(context: Any, error: ModelyardError) -> None:
        if on_denied is not None and isinstance(error, PermissionDenied):
            principal = _principal_var.get()
            await on_denied(
                DeniedCall(
                    method=method.rpartition("/")[2],
                    actor=principal.name if principal is not None else "anonymous",
                    code="PERMISSION_DENIED",
                    message=error.message[:256],
                    model=error.metadata.get("model", ""),
                )
            )
        await context.abort_with_status(to_rpc_status(error))

    def admit(*, rate: bool = True) -> Callable[[], None] | None:
        principal = _principal_var.get()
        return limits.admit(principal, rate=rate) if limits is not None and principal is not None else None

    if handler.request_streaming:

        async def checked(requests: Any, context: Any) -> Any:
            principal = _principal_var.get()
            async for item in requests:
                try:
                    if not isinstance(item, (bytes, bytearray)):
                        check(item)
                    if limits is not None and principal is not None:
                        limits.take(principal)
                except ModelyardError as error:
                    await refused(context, error)
                yield item

        if inspect.isasyncgenfunction(behavior):

            async def guarded_stream_stream(requests: Any, context: Any) -> Any:
                release = _admit_or_abort(lambda: admit(rate=False))
                if isinstance(release, ModelyardError):
                    await refused(context, release)
                try:
                    async for out in behavior(checked(requests, context), context):
                        yield out
                finally:
                    if callable(release):
                        release()

            wrapped: Any = guarded_stream_stream
        else:

            async def guarded_stream_unary(requests: Any, context: Any) -> Any:
                return await behavior(checked(requests, context), context)

            wrapped = guarded_stream_unary
    elif inspect.isasyncgenfunction(behavior):

        async def guarded_unary_stream(request: Any, context: Any) -> Any:
            try:
                check(request)
            except ModelyardError as error:
                await refused(context, error)
            async for out in behavior(request, context):
                yield out

        wrapped = guarded_unary_stream
    else:

        async def guarded(request: Any, context: Any) -> Any:
            pending = None
            release = None
            try:
                if rule.in_handler:
                    pending = _Pending(verb)
                    _pending_var.set(pending)
                else:
                    check(request)
                release = admit()
            except ModelyardError as error:
                await refused(context, error)
            try:
                result = await behavior(request, context)
            finally:
                if release is not None:
                    release()
            if pending is not None and not pending.checked:
                log.error("%s answered without checking the caller's grant on its model; refused", method)
                await refused(context, PermissionDenied(f"{method[:120]}: the grant could not be checked"))
            return result

        wrapped = guarded

    return factory_of(handler)(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _admit_or_abort(
    admit: Callable[[], Callable[[], None] | None],
) -> Callable[[], None] | ModelyardError | None:
    try:
        return admit()
    except ModelyardError as error:
        return error
