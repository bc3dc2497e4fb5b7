"""wan22.request.intake: the image sources a request names (URL, base64, path) and the checks on what they hold.

Pixel and byte bounds, formats, base64 and data URIs, paths only under the input roots (symlinks and a folder
swapped between check and open included), the public-address test behind the SSRF protection (IPv6 forms that
embed an IPv4 judged as that IPv4) and fetch_url's redirects, size and time bounds. URL tests serve from a local
http.server on 127.0.0.1 only (never an external address).
"""
from __future__ import annotations

import base64
import io
import os
import time

import pytest

import comfy_fixture as cf
import wan22.request.intake as intake
from wan22.request.errors import InvalidParameter
from wan22.request.intake import check_image, decode_base64, fetch_url, is_public_address, read_file, read_image
from wan22.request.settings import Limits


def png_bytes(w=24, h=16, color=(10, 200, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- bytes and files
def test_check_image_formats_and_pixel_bound():
    ok = check_image(png_bytes(30, 20), "f", 10_000)
    assert (ok.width, ok.height, ok.format) == (30, 20, "PNG") and ok.png.startswith(b"\x89PNG")
    with pytest.raises(InvalidParameter, match="pixels"):
        check_image(png_bytes(200, 100), "f", 10_000)
    with pytest.raises(InvalidParameter, match="not an image"):
        check_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "f", 10_000)
    with pytest.raises(InvalidParameter, match="not an image"):
        check_image(b"<html>not found</html>", "f", 10_000)
    with pytest.raises(InvalidParameter):
        check_image(png_bytes(64, 64)[:60], "f", 10_000)  # truncated


def test_base64_bounds_and_data_uri():
    data = png_bytes()
    b64 = base64.b64encode(data).decode()
    assert decode_base64(b64, "f", 10_000) == data
    assert decode_base64("data:image/png;base64," + b64, "f", 10_000) == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode().rstrip("="), "f", 10_000) == data
    with pytest.raises(InvalidParameter, match="limit"):
        decode_base64(base64.b64encode(b"x" * 5000).decode(), "f", 1000)
    with pytest.raises(InvalidParameter, match="limit"):
        decode_base64("A" * 100_000, "f", 1000)  # refused before decoding
    with pytest.raises(InvalidParameter, match="base64"):
        decode_base64("not*base64!", "f", 1000)


def test_paths_only_under_roots(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(tmp_path, root / "dirlink")
    (root / "sub").mkdir()
    roots = [str(root)]
    assert read_file(str(root / "a.png"), "f", 10**6, roots) == png_bytes()
    assert read_file(str(root / "sub" / ".." / "a.png"), "f", 10**6, roots) == png_bytes()
    for bad, why in [
        (str(root / ".." / "secret.png"), "outside"),
        (str(root / "link.png"), "outside"),
        (str(root / "dirlink" / "secret.png"), "outside"),
        ("/etc/passwd", "outside"),
        ("a.png", "absolute"),
        (str(root / "missing.png"), "does not exist"),
        (str(root / "sub"), "not a regular file"),
        (str(root) + "x/a.png", "outside"),
    ]:
        with pytest.raises(InvalidParameter, match=why):
            read_file(bad, "params.reference_image_path", 10**6, roots)
    with pytest.raises(InvalidParameter, match="limit"):
        read_file(str(root / "a.png"), "f", 10, roots)


@pytest.mark.parametrize("swap_at", ["after the name check", "just before the open"])
def test_folder_swapped_for_a_symlink_after_the_check_is_refused(tmp_path, monkeypatch, swap_at):
    """A folder under the root replaced by a symlink to outside between the path check and os.open: the file
    actually opened (/proc/self/fd/N) is judged, and its bytes never come back."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    (outside / "d").mkdir(parents=True)
    inside_bytes, secret = png_bytes(8, 8, (1, 2, 3)), b"SECRET-" + png_bytes(8, 8, (9, 9, 9))
    (root / "d" / "a.png").write_bytes(inside_bytes)
    (outside / "d" / "a.png").write_bytes(secret)
    target = str(root / "d" / "a.png")
    opened = []

    def swap():
        os.rename(root / "d", root / "d.old")
        os.symlink(outside / "d", root / "d")

    if swap_at == "after the name check":
        real_within = intake.within

        def within(path, roots):
            ok = real_within(path, roots)
            if not opened and not (root / "d").is_symlink():
                swap()
            return ok

        monkeypatch.setattr(intake, "within", within)
    real_open = os.open

    def spy_open(path, flags, *args, **kwargs):
        if swap_at == "just before the open" and str(path) == target and not (root / "d").is_symlink():
            swap()
        fd = real_open(path, flags, *args, **kwargs)
        if str(path).endswith("a.png"):
            opened.append(os.fstat(fd).st_ino)
        return fd

    monkeypatch.setattr(os, "open", spy_open)
    with pytest.raises(InvalidParameter, match="outside") as info:
        data = read_file(target, "f", 10**6, [str(root)])
        if secret in data:
            pytest.fail("read_file returned the bytes of a file outside the roots")
    assert opened == [(outside / "d" / "a.png").stat().st_ino]  # the race really happened: the secret was opened
    assert b"SECRET" not in str(info.value).encode()
    monkeypatch.undo()
    # the same read without the swap is fine
    os.unlink(root / "d")
    os.rename(root / "d.old", root / "d")
    assert read_file(target, "f", 10**6, [str(root)]) == inside_bytes


# ----------------------------------------------------------------------------------------------- addresses (SSRF)
def test_public_address_classification():
    for ip in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "100.64.0.1", "::1", "fe80::1",
               "::ffff:127.0.0.1", "0.0.0.0", "fd00::1", "2002:7f00:1::", "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe"):
        assert not is_public_address(ip), ip
    for ip in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2002:808:808::1", "64:ff9b::808:808"):
        assert is_public_address(ip), ip


def _v6(v4: str, prefix: int, shift: int = 0) -> str:
    import ipaddress

    return str(ipaddress.IPv6Address(prefix | int(ipaddress.IPv4Address(v4)) << shift))


def _teredo(server: str, client: str) -> str:
    """2001:0:<server>:<flags>:<port>:<client>, the client address stored inverted (RFC 4380)."""
    import ipaddress

    s, c = int(ipaddress.IPv4Address(server)), int(ipaddress.IPv4Address(client))
    return str(ipaddress.IPv6Address(0x20010000 << 96 | s << 64 | 0x8000_1234 << 32 | (~c & 0xFFFFFFFF)))


# every IPv6 form that embeds an IPv4 address: each is judged as the IPv4 it carries
EMBEDDING_FORMS = {
    "mapped ::ffff:a.b.c.d": lambda v4: f"::ffff:{v4}",
    "6to4 2002::/16": lambda v4: _v6(v4, 0x2002 << 112, 80),
    "teredo client": lambda v4: _teredo("8.8.4.4", v4),
    "teredo server": lambda v4: _teredo(v4, "8.8.4.4"),
    "nat64 64:ff9b::/96": lambda v4: f"64:ff9b::{v4}",
    "nat64 local-use 64:ff9b:1::/48": lambda v4: _v6(v4, 0x0064_ff9b_0001 << 80),
    "ipv4-compatible ::a.b.c.d": lambda v4: f"::{v4}",
}


@pytest.mark.parametrize("form", sorted(EMBEDDING_FORMS))
@pytest.mark.parametrize("v4, public", [("127.0.0.1", False), ("10.1.2.3", False), ("169.254.169.254", False),
                                        ("100.64.0.1", False), ("8.8.8.8", True), ("1.1.1.1", True)])
def test_ipv6_with_embedded_ipv4_is_judged_as_that_ipv4(form, v4, public):
    ip = EMBEDDING_FORMS[form](v4)
    assert is_public_address(v4) is public
    assert is_public_address(ip) is public, (form, ip)


def test_embedded_ipv4_special_cases():
    assert _teredo("8.8.4.4", "8.8.8.8").startswith("2001:0:808:404:")
    assert not is_public_address("2002:7f00:1::")          # 6to4 of 127.0.0.1
    assert not is_public_address(_teredo("10.0.0.1", "192.168.1.1"))
    assert not is_public_address("64:ff9b:1:ffff::7f00:1")  # local-use NAT64: the last 32 bits count
    for ip in ("::", "::1", "::0.0.0.2"):                    # unspecified, loopback, 0.0.0.0/8
        assert not is_public_address(ip), ip


# ----------------------------------------------------------------------------------------------- fetch_url
@pytest.fixture(scope="module")
def image_server():
    data = png_bytes(40, 30)
    routes = {}

    def ok(h):
        cf.reply(h, 200, data, "image/png")
    def redirect_to(target):
        def f(h):
            h.send_response(302)
            h.send_header("Location", target)
            h.end_headers()
        return f

    def big(h):
        h.send_response(200)
        h.end_headers()  # no Content-Length: the cap applies while reading
        try:
            for _ in range(64):
                h.wfile.write(b"\0" * 65536)
        except OSError:
            pass

    def slow(h):
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        try:
            for _ in range(100):
                h.wfile.write(b"\0" * 10)
                h.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    def html(h):
        cf.reply(h, 200, b"<html>hello</html>", "image/png")  # lies

    # a second "internal" port the allowlist does not cover
    with cf.loopback_http(routes) as base, cf.loopback_http({"/a.png": ok}) as other:
        routes.update({
            "/a.png": ok, "/big": big, "/slow": slow, "/html": html,
            "/r1": redirect_to("/a.png"),
            "/loop": redirect_to("/loop"),
            "/to-other": redirect_to(f"{other}/a.png"),
            "/to-file": redirect_to("file:///etc/passwd"),
        })
        yield {"base": base, "allow": (base.split("://", 1)[1],), "data": data, "other": other}


def _fetch(url, allow, **kw):
    args = dict(max_bytes=1_000_000, timeout_s=5, max_redirects=3, allow_hosts=allow)
    args.update(kw)
    return fetch_url(url, "params.reference_image_url", **args)


def test_url_fetch_allowed_host_and_redirect(image_server):
    base, allow = image_server["base"], image_server["allow"]
    assert _fetch(base + "/a.png", allow) == image_server["data"]
    assert _fetch(base + "/r1", allow) == image_server["data"]


@pytest.mark.parametrize("path, needle", [
    ("/loop", "redirects"),
    ("/to-other", "non-public"),
    ("/to-file", "scheme"),
    ("/big", "larger than"),
    ("/missing", "HTTP 404"),
])
def test_url_fetch_rejections(image_server, path, needle):
    with pytest.raises(InvalidParameter, match=needle) as exc:
        _fetch(image_server["base"] + path, image_server["allow"])
    assert exc.value.field.startswith("params.reference_image_url")


def test_url_fetch_private_blocked_without_allowlist(image_server):
    with pytest.raises(InvalidParameter, match="non-public"):
        _fetch(image_server["base"] + "/a.png", ())
    with pytest.raises(InvalidParameter, match="non-public"):
        _fetch(image_server["other"] + "/a.png", image_server["allow"])


def test_url_fetch_total_time_bounded(image_server):
    t0 = time.monotonic()
    with pytest.raises(InvalidParameter, match="longer than"):
        _fetch(image_server["base"] + "/slow", image_server["allow"], timeout_s=1.0)
    assert time.monotonic() - t0 < 5


def test_url_schemes_refused():
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://x", "data:image/png;base64,AAAA", "//x/a.png"):
        with pytest.raises(InvalidParameter, match="scheme"):
            _fetch(url, ())


def test_read_image_fetches_and_checks_the_content(image_server):
    """read_image with the limits of the environment (WAN_URL_ALLOW_HOSTS lets the loopback server through)."""
    limits = Limits.from_env({"WAN_URL_ALLOW_HOSTS": image_server["allow"][0]})
    img = read_image("url", image_server["base"] + "/a.png", "params.reference_image_url", limits)
    assert (img.width, img.height) == (40, 30)
    with pytest.raises(InvalidParameter, match="not an image"):
        read_image("url", image_server["base"] + "/html", "params.reference_image_url", limits)
