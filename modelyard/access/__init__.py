"""Access control: API keys, service tokens, grants, and the one check every service runs.

See docs/security.md ("Access control") for the model and how to operate keys.
"""

from modelyard.access.grants import Grant, Grants, InvalidGrant
from modelyard.access.interceptor import (
    AUTHORIZATION_METADATA_KEY,
    AccessControl,
    AccessScreen,
    DeniedCall,
    check_listen_address,
    current_principal,
    require,
    visible,
)
from modelyard.access.keys import KeyBook, KeyRecord, Principal, ServiceTokens, hash_token, new_key_token
from modelyard.access.limits import KeyLimits

__all__ = [
    "AUTHORIZATION_METADATA_KEY",
    "AccessControl",
    "AccessScreen",
    "DeniedCall",
    "Grant",
    "Grants",
    "InvalidGrant",
    "KeyBook",
    "KeyLimits",
    "KeyRecord",
    "Principal",
    "ServiceTokens",
    "check_listen_address",
    "current_principal",
    "hash_token",
    "new_key_token",
    "require",
    "visible",
]
