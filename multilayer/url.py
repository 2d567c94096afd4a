"""Layer URLs: ``scheme://[user[:password]@]host[:port][,host[:port]...][/path][?option=value...]``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import parse_qsl, quote, unquote

from .exceptions import ConfigurationError

__all__ = ["LayerURL"]

# Query options whose values are credentials: masked wherever the URL is shown.
_SECRET_OPTION = re.compile(r"password|secret|token|passphrase|encryption", re.IGNORECASE)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://(.*)$", re.DOTALL)
# The value of a secret option in a query string that may not parse.
_SECRET_VALUE = re.compile(
    r"((?:password|secret|token|passphrase|encryption)[^=&#]*=)[^&#]*", re.IGNORECASE
)
# An '@' before any option value (which may hold one) after the host part.
_STRAY_AT = re.compile(r"^[^=&]*@")
# What no host name or address contains.
_BAD_HOST = re.compile(r"[\s/?#@\\\x00-\x1f\x7f]")


@dataclass(frozen=True, repr=False)
class LayerURL:
    """An immutable, parsed layer URL.

    ``hosts`` keeps every ``host:port`` of a comma-separated host list, in order; IPv6
    addresses are written in brackets (``[::1]:6379``) and stored without them. The
    username and password are percent-decoded. The password, and query options whose names
    say they are secret (password, secret, token, passphrase, encryption), never appear in
    ``repr()``, ``str()`` or :meth:`sanitized`; use those in logs and errors.
    """

    scheme: str
    hosts: tuple[tuple[str, int | None], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    path: str = ""
    query: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def parse(cls, url: str) -> LayerURL:
        """Parse ``url``; raise :class:`ConfigurationError` naming what is wrong."""
        if not isinstance(url, str):
            raise ConfigurationError(f"layer URL must be a string, not {type(url).__name__}")
        match = _SCHEME.match(url.strip())
        if match is None:
            raise ConfigurationError(
                f"layer URL {_redact(url)!r} has no scheme; write it as scheme://..., "
                "for example memory:// or redis://localhost:6379/0"
            )
        scheme, rest = match.group(1).lower(), match.group(2)
        rest, _, query_string = rest.partition("?")
        rest, _, fragment = rest.partition("#")
        netloc, slash, path = rest.partition("/")
        if "@" not in netloc and ("@" in path or "@" in fragment or _STRAY_AT.search(query_string)):
            # A password with an unencoded '/', '?' or '#' ends the host part early; what
            # follows would show up as path or options. The URL is not shown: it holds it.
            raise ConfigurationError(
                "layer URL has an '@' after its host part: percent-encode '/', '?', '#' "
                "and '@' in a user name or password (%2F, %3F, %23, %40), and '@' in a path"
            )
        username = password = None
        if "@" in netloc:
            userinfo, _, netloc = netloc.rpartition("@")
            user, has_password, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if has_password else None
        hosts = tuple(
            _parse_host(item, url, show_port=username is not None or password is not None)
            for item in netloc.split(",")
            if item
        )
        query: dict[str, str] = {}
        for key, value in parse_qsl(query_string, keep_blank_values=True, strict_parsing=False):
            if key in query:
                raise ConfigurationError(
                    f"option {key!r} appears twice in layer URL {_redact(url)!r}"
                )
            query[key] = value
        return cls(
            scheme=scheme,
            hosts=hosts,
            username=username,
            password=password,
            path=unquote(path) if slash else "",
            query=MappingProxyType(query),
        )

    @property
    def host(self) -> str | None:
        """The first host, or None."""
        return self.hosts[0][0] if self.hosts else None

    @property
    def port(self) -> int | None:
        """The first host's port, or None."""
        return self.hosts[0][1] if self.hosts else None

    def sanitized(self) -> str:
        """The URL with the password replaced by ``***``: safe for logs and errors."""
        return self._render(mask_password=True)

    def render(self) -> str:
        """The full URL, password included, for handing to a client library."""
        return self._render(mask_password=False)

    def without_query(self) -> LayerURL:
        """The same URL with no options."""
        return LayerURL(self.scheme, self.hosts, self.username, self.password, self.path)

    def _render(self, *, mask_password: bool) -> str:
        auth = ""
        if self.username is not None or self.password is not None:
            auth = quote(self.username or "", safe="")
            if self.password is not None:
                auth += ":" + ("***" if mask_password else quote(self.password, safe=""))
            auth += "@"
        hosts = ",".join(
            (f"[{h}]" if ":" in h else h) + (f":{p}" if p is not None else "")
            for h, p in self.hosts
        )
        path = "/" + quote(self.path, safe="/:") if self.path else ""
        query = "&".join(
            f"{quote(k)}="
            + ("***" if mask_password and _SECRET_OPTION.search(k) else quote(v, safe=""))
            for k, v in self.query.items()
        )
        return f"{self.scheme}://{auth}{hosts}{path}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.sanitized()

    def __repr__(self) -> str:
        # The field-by-field form would show secret query options.
        return f"LayerURL({self.sanitized()!r})"


def _parse_host(item: str, url: str, *, show_port: bool) -> tuple[str, int | None]:
    if item.startswith("["):
        host, bracket, tail = item[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ConfigurationError(f"bad IPv6 host {item!r} in layer URL {_redact(url)!r}")
        port_text = tail[1:]
    else:
        host, _, port_text = item.partition(":")
    host = unquote(host)
    if _BAD_HOST.search(host):
        raise ConfigurationError(f"bad host {host!r} in layer URL {_redact(url)!r}")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        # Without an '@' before the host, a password after "user:" reads as a port: then
        # neither the port text nor the URL is shown.
        shown = f" {port_text!r} in layer URL {_redact(url)!r}" if show_port else ""
        raise ConfigurationError(
            f"bad port{shown} for host {host!r}: it must be a number from 1 to 65535"
        )
    return host, int(port_text)


def _redact(url: str) -> str:
    """Mask a password in a URL that may not even parse.

    Everything from the first ':' after the scheme to the last '@' is masked: a password
    may hold '/', ':' or '@', and masking too much is harmless in an error message.
    """
    masked = re.sub(
        r"^(\s*[a-zA-Z][a-zA-Z0-9+.\-]*:/*[^/@:]*:).*@", r"\1***@", url, flags=re.DOTALL
    )
    if masked == url and "@" in url:
        # Not even scheme:[//]user:password@: whatever precedes the last '@' may be secret.
        masked = "***" + url[url.rindex("@") :]
    return _SECRET_VALUE.sub(r"\1***", masked)
