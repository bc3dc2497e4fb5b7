"""The one image intake: a reference image from a URL, base64 or a path, with bounds (no torch, ComfyUI or RunPod).

Used by the `Wan22LoadImage` node, the CLI, the RunPod worker and ``python -m wan22``. A request from the network
(node, worker) is untrusted:

- URL: http/https only; the host must resolve to public addresses (loopback, private, link-local such as the
  169.254.169.254 metadata service and CGNAT are refused unless listed in WAN_URL_ALLOW_HOSTS; an IPv6 address
  that embeds an IPv4 one, IPv4-mapped, IPv4-compatible, 6to4, Teredo or NAT64, is judged as that IPv4); the
  connection is pinned to the checked address (no DNS rebinding); redirects are followed by hand, at most
  WAN_URL_MAX_REDIRECTS, each target checked again; the body is capped at WAN_MAX_IMAGE_MB and the whole
  download at WAN_URL_TIMEOUT_S seconds.
- base64 (optionally a data: URI): the encoded length is capped before decoding.
- path: absolute, under WAN_INPUT_ROOTS once symlinks and `..` are resolved (checked again on the opened file),
  a regular file, capped size.
A `trusted` caller (the CLI, on its user's own machine) may read any local path and fetch from private
addresses. Whatever the source, the bytes must decode as an image of an allowed format (PNG, JPEG, WEBP, BMP,
GIF, TIFF: never EPS and the like, which PIL would hand to external programs) with at most
WAN_MAX_IMAGE_PIXELS pixels; what goes on is an RGB picture (EXIF orientation applied) and its PNG encoding.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import ipaddress
import os
import re
import socket
import stat
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union
from urllib.parse import urljoin, urlparse

from .errors import InvalidParameter
from .files import within
from .settings import Limits

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
REDIRECTS = (301, 302, 303, 307, 308)
_EXTRA_BLOCKED = [ipaddress.ip_network("100.64.0.0/10")]
# IPv6 prefixes whose last 32 bits are an IPv4 address: NAT64 well-known (RFC 6052), NAT64 local-use (RFC 8215),
# IPv4-compatible (deprecated, RFC 4291; :: and ::1 excepted)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


@dataclasses.dataclass
class CheckedImage:
    picture: "object"   # PIL.Image in RGB
    width: int
    height: int
    format: str         # the format the source bytes had
    source_bytes: int

    @functools.cached_property
    def png(self) -> bytes:
        """What is uploaded to ComfyUI: a PNG encoded here, never the caller's bytes."""
        out = io.BytesIO()
        self.picture.save(out, format="PNG")
        return out.getvalue()


# --------------------------------------------------------------------------------------------- decode
def check_image(data: bytes, field: str, max_pixels: int, single_frame: bool = False) -> CheckedImage:
    """Decode `data` as an image (allowed formats only, bounded pixel count) into RGB: its first frame, or with
    `single_frame` refused when it has several (where the original bytes go on to a decoder that reads every
    frame, e.g. ComfyUI's LoadImage: a small GIF can hold thousands of full-size frames)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        raise InvalidParameter(field, f"is not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the input's fault
        raise InvalidParameter(field, f"could not be read as an image: {exc}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidParameter(field, "is an empty image")
    if width * height > max_pixels:
        raise InvalidParameter(field, f"is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (WAN_MAX_IMAGE_PIXELS)")
    fmt = img.format or "?"
    frames = getattr(img, "n_frames", 1)
    if single_frame and frames != 1:
        raise InvalidParameter(field, f"is an image of {frames} frames ({fmt}); send a single-frame image (e.g. the "
                                      "frame you want as PNG or JPEG)")
    try:
        img.seek(0)
        img.load()
        rgb = ImageOps.exif_transpose(img).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise InvalidParameter(field, f"is too large to decode safely: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise InvalidParameter(field, f"is a damaged or truncated {fmt} image: {exc}") from None
    return CheckedImage(picture=rgb, width=rgb.width, height=rgb.height, format=fmt, source_bytes=len(data))


# --------------------------------------------------------------------------------------------- base64
_DATA_URI = re.compile(r"data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)


def decode_base64(value: str, field: str, max_bytes: int) -> bytes:
    text = value.strip()
    match = _DATA_URI.match(text)
    if match:
        text = text[match.end():]
    max_chars = (max_bytes + 2) // 3 * 4 + 4096  # allow whitespace / line breaks
    if len(text) > max_chars:
        raise InvalidParameter(field, f"is {len(text)} base64 characters (about {len(text) * 3 // 4} bytes); the limit is {max_bytes} bytes (WAN_MAX_IMAGE_MB)")
    text = re.sub(r"\s+", "", text)
    if not text:
        raise InvalidParameter(field, "is empty")
    try:
        # accept the URL-safe alphabet too; validate=True refuses stray characters
        if "-" in text or "_" in text:
            text = text.replace("-", "+").replace("_", "/")
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidParameter(field, f"is not valid base64: {exc}") from None
    if len(data) > max_bytes:
        raise InvalidParameter(field, f"decodes to {len(data)} bytes; the limit is {max_bytes} (WAN_MAX_IMAGE_MB)")
    return data


# --------------------------------------------------------------------------------------------- path
def read_file(path: str, field: str, max_bytes: int, roots: Optional[Sequence[str]] = None) -> bytes:
    """Read a regular file of at most `max_bytes`. With `roots`, the path must be absolute and its real path
    (symlinks and `..` resolved) lie under one of them, both before opening and for the file actually opened."""
    if not isinstance(path, str) or not path:
        raise InvalidParameter(field, "must be a file path")
    if "\x00" in path:
        raise InvalidParameter(field, "contains a NUL character")
    outside = f"{path!r} is outside the allowed input folders {':'.join(roots or ())} (WAN_INPUT_ROOTS); symlinks and '..' are resolved first"
    if roots is not None:
        if not os.path.isabs(path):
            raise InvalidParameter(field, f"must be an absolute path under {':'.join(roots)} (WAN_INPUT_ROOTS), got {path!r}")
        if not within(path, roots):
            raise InvalidParameter(field, outside)
        path = os.path.realpath(path)
    try:
        fd = os.open(os.path.expanduser(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) * (roots is not None) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InvalidParameter(field, f"{path!r} does not exist") from None
    except OSError as exc:
        raise InvalidParameter(field, f"{path!r} cannot be opened: {exc.strerror}") from None
    try:
        # a folder swapped for a symlink between the check and the open: the opened file decides
        opened = f"/proc/self/fd/{fd}"
        if roots is not None and os.path.exists(opened) and not within(os.readlink(opened), roots):
            raise InvalidParameter(field, outside)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidParameter(field, f"{path!r} is not a regular file")
        if st.st_size > max_bytes:
            raise InvalidParameter(field, f"{path!r} is {st.st_size} bytes; the limit is {max_bytes} (WAN_MAX_IMAGE_MB)")
        chunks: List[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise InvalidParameter(field, f"{path!r} is larger than {max_bytes} bytes (WAN_MAX_IMAGE_MB)")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- URL
def _embedded_ipv4(address: ipaddress.IPv6Address) -> List[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for (mapped, 6to4, Teredo server and client, NAT64,
    IPv4-compatible); empty for a native IPv6 address."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in net for net in _NAT64):
        return [low32]
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: and ::1 (judged as IPv6 below)
        return [low32]
    return []


def is_public_address(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.version == 6:
        embedded = _embedded_ipv4(address)
        if embedded:
            return all(is_public_address(str(v4)) for v4 in embedded)
    if any(address in net for net in _EXTRA_BLOCKED if address.version == net.version):
        return False
    if (address.is_private or address.is_loopback or address.is_link_local or address.is_reserved
            or address.is_multicast or address.is_unspecified):
        return False
    return address.is_global


def _host_allowed(host: str, port: int, allow_hosts: Sequence[str]) -> bool:
    host = host.lower().strip("[]")
    allowed = {h.lower() for h in allow_hosts}
    return host in allowed or f"{host}:{port}" in allowed


def _resolve(host: str, port: int, field: str, allow_hosts: Sequence[str], private_ok: bool) -> List[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidParameter(field, f"host {host!r} could not be resolved: {exc}") from None
    ips: List[str] = []
    for info in infos:
        if info[4][0] not in ips:
            ips.append(info[4][0])
    if not ips:
        raise InvalidParameter(field, f"host {host!r} resolved to no address")
    if not private_ok and not _host_allowed(host, port, allow_hosts):
        for ip in ips:
            if not is_public_address(ip):
                raise InvalidParameter(field, f"host {host!r} resolves to the non-public address {ip}; only public hosts are fetched (WAN_URL_ALLOW_HOSTS lists exceptions)")
    return ips


@functools.lru_cache(maxsize=None)
def _pinned_adapter_class():
    """A requests adapter that dials the checked IP and keeps Host, SNI and certificate checks bound to the URL's
    host name (what the runpod SDK's PinnedIPAdapter does; this module must not need the SDK)."""
    from requests.adapters import HTTPAdapter

    class PinnedIPAdapter(HTTPAdapter):
        def __init__(self, pinned_ip: str, **kwargs):
            self._pinned_ip = pinned_ip
            super().__init__(**kwargs)

        def send(self, request, **kwargs):
            parsed = urlparse(request.url)
            host = parsed.hostname or ""
            host = f"[{host}]" if ":" in host else host
            request.headers["Host"] = f"{host}:{parsed.port}" if parsed.port else host
            return super().send(request, **kwargs)

        def _pin(self, pool, url):
            parsed = urlparse(url)
            if parsed.scheme == "https":
                pool.assert_hostname = parsed.hostname
                pool.conn_kw = dict(pool.conn_kw or {})
                pool.conn_kw["server_hostname"] = parsed.hostname
            pool.host = self._pinned_ip
            return pool

        def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
            return self._pin(super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert),
                             request.url)

        def get_connection(self, url, proxies=None):  # requests < 2.32
            return self._pin(super().get_connection(url, proxies=proxies), url)

    return PinnedIPAdapter


def check_url_syntax(url: str, field: str) -> None:
    if not isinstance(url, str) or not url:
        raise InvalidParameter(field, "must be an http or https URL")
    if len(url) > 8192:
        raise InvalidParameter(field, f"is {len(url)} characters long; the limit is 8192")
    parsed = urlparse(url)
    if parsed.scheme.lower() not in ("http", "https"):
        raise InvalidParameter(field, f"scheme {parsed.scheme or '(none)'!r} is not allowed: only http and https URLs are fetched")
    if not parsed.hostname:
        raise InvalidParameter(field, f"URL {url!r} has no host")


def fetch_url(url: str, field: str, *, max_bytes: int, timeout_s: float, max_redirects: int,
              allow_hosts: Sequence[str] = (), private_ok: bool = False) -> bytes:
    """GET `url` with the protections listed in the module docstring; return the body."""
    import requests

    adapter_class = _pinned_adapter_class()
    deadline = time.monotonic() + timeout_s
    too_slow = f"download took longer than {timeout_s:g} s (WAN_URL_TIMEOUT_S)"
    current = url
    for hop in range(max_redirects + 1):
        where = field if hop == 0 else f"{field} (redirect {hop} to {current})"
        check_url_syntax(current, where)
        parsed = urlparse(current)
        port = parsed.port or (443 if parsed.scheme.lower() == "https" else 80)
        ips = _resolve(parsed.hostname or "", port, where, allow_hosts, private_ok)
        response = session = None
        last_error: Optional[Exception] = None
        for ip in ips:
            session = requests.Session()
            session.trust_env = False  # no proxy: the pinned address is what gets dialed
            adapter = adapter_class(ip)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            left = deadline - time.monotonic()
            if left <= 0:
                session.close()
                raise InvalidParameter(field, too_slow)
            try:
                response = session.get(current, allow_redirects=False, stream=True, timeout=(min(left, 10.0), left),
                                       headers={"User-Agent": "wan22-i2v", "Accept": "image/*"})
                break
            except requests.ConnectionError as exc:
                session.close()
                last_error = exc
            except requests.Timeout:
                session.close()
                raise InvalidParameter(field, too_slow) from None
            except requests.RequestException as exc:
                session.close()
                raise InvalidParameter(where, f"could not be fetched: {exc}") from None
        if response is None:
            raise InvalidParameter(where, f"could not connect: {last_error}")
        try:
            if response.status_code in REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise InvalidParameter(where, f"redirect ({response.status_code}) without a Location header")
                current = urljoin(current, location)
                continue
            if response.status_code != 200:
                raise InvalidParameter(where, f"answered HTTP {response.status_code} {response.reason or ''}".rstrip())
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise InvalidParameter(field, f"is {int(declared)} bytes; the limit is {max_bytes} (WAN_MAX_IMAGE_MB)")
            return _read_capped(response, field, max_bytes, deadline, too_slow)
        finally:
            response.close()
            if session is not None:
                session.close()
    raise InvalidParameter(field, f"more than {max_redirects} redirects (WAN_URL_MAX_REDIRECTS)")


def _socket_of(response):
    """The socket under a streamed requests response (urllib3 2.x, or http.client's file object)."""
    raw = getattr(response, "raw", None)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock


def _read_capped(response, field: str, max_bytes: int, deadline: float, too_slow: str) -> bytes:
    """Read the body with a byte cap; a watchdog closes the connection at the deadline (slow servers)."""
    timed_out = threading.Event()
    sock = _socket_of(response)

    def expire() -> None:
        timed_out.set()
        if sock is not None:
            try:  # wakes a recv() blocked in another thread, unlike close()
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            response.close()
        except Exception:  # noqa: BLE001
            pass

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
    timer.daemon = True
    timer.start()
    chunks: List[bytes] = []
    total = 0
    try:
        for chunk in response.iter_content(chunk_size=65536):
            if timed_out.is_set():
                break
            total += len(chunk)
            if total > max_bytes:
                raise InvalidParameter(field, f"is larger than {max_bytes} bytes (WAN_MAX_IMAGE_MB)")
            chunks.append(chunk)
    except InvalidParameter:
        raise
    except Exception as exc:  # noqa: BLE001
        if timed_out.is_set():
            raise InvalidParameter(field, too_slow) from None
        raise InvalidParameter(field, f"download failed: {exc}") from None
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise InvalidParameter(field, too_slow)
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------- entry
def read_image_bytes(kind: str, value: str, field: str, limits: Limits, trusted: bool = False) -> bytes:
    """The raw bytes of an image source; kind is url | base64 | path (wan22.request.spec.image_source)."""
    if kind == "url":
        check_url_syntax(value, field)
        return fetch_url(value, field, max_bytes=limits.max_image_bytes, timeout_s=limits.url_timeout_s,
                         max_redirects=limits.url_max_redirects, allow_hosts=limits.url_allow_hosts, private_ok=trusted)
    if kind == "base64":
        return decode_base64(value, field, limits.max_image_bytes)
    if kind == "path":
        if trusted and value.lower().startswith("file://"):
            value = value[7:]
        return read_file(value, field, limits.max_image_bytes, None if trusted else limits.input_roots)
    raise InvalidParameter(field, f"unknown image source {kind!r}")


def read_image(kind: str, value: str, field: str, limits: Optional[Limits] = None, trusted: bool = False) -> CheckedImage:
    """Fetch, read or decode an image source and check it (see the module docstring)."""
    limits = limits or Limits.from_env()
    return check_image(read_image_bytes(kind, value, field, limits, trusted), field, limits.max_image_pixels)


def open_image(source: Union[str, os.PathLike, bytes], field: str = "image") -> "object":
    """A trusted local file (or bytes) as an RGB PIL image, with the pixel and size bounds (the engine's entry)."""
    limits = Limits.from_env()
    if isinstance(source, (bytes, bytearray)):
        return check_image(bytes(source), field, limits.max_image_pixels).picture
    return read_image("path", str(Path(source)), field, limits, trusted=True).picture
