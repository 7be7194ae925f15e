"""Safe URL fetching. All traffic goes to 127.0.0.1; other addresses are either refused before any
socket is opened or met by a stubbed resolver and a stubbed connect that record and fail."""

from __future__ import annotations

import ipaddress
import socket
import time

import httpcore
import pytest

from tests.workers.workers_testlib import JPEG, PNG
from workers.addresses import SPECIAL_PURPOSE, AllowRule, address_refusal
from workers.fetch import TRANSIENT_REASONS, FetchError, ImageFetcher, _VettedBackend


@pytest.fixture
def connects(monkeypatch) -> list[tuple[str, int]]:
    """Every socket the fetcher opens, as (ip, port); only loopback ones really connect."""
    seen: list[tuple[str, int]] = []
    real_open = _VettedBackend._open

    def spy(self, ip, port, *args):
        seen.append((ip, port))
        if not ipaddress.ip_address(ip).is_loopback:
            raise httpcore.ConnectError("test: non-loopback connect blocked")
        return real_open(self, ip, port, *args)

    monkeypatch.setattr(_VettedBackend, "_open", spy)
    return seen


def fetcher_for(server, **kw) -> ImageFetcher:
    kw.setdefault("read_timeout_s", 0.5)
    kw.setdefault("connect_timeout_s", 0.5)
    return ImageFetcher(allow=[f"127.0.0.1:{server.port}"], max_bytes=1024 * 1024, **kw)


def reason_of(fetcher: ImageFetcher, url: str) -> FetchError:
    with pytest.raises(FetchError) as ei:
        fetcher.fetch(url)
    assert ei.value.transient == (ei.value.reason in TRANSIENT_REASONS)
    return ei.value


# --- local server ------------------------------------------------------------------------------------


def test_fetches_png_and_jpeg(image_server, connects):
    f = fetcher_for(image_server)
    assert f.fetch(image_server.url("/img.png")) == PNG
    assert f.fetch(image_server.url("/img.jpg")) == JPEG
    assert {ip for ip, _ in connects} == {"127.0.0.1"}


def test_loopback_refused_without_allow_list(image_server, connects):
    e = reason_of(ImageFetcher(), image_server.url("/img.png"))
    assert e.reason == "private_address" and not e.transient
    assert connects == []


def test_allow_entry_with_port_is_port_specific(image_server, connects):
    f = ImageFetcher(allow=[f"127.0.0.1:{image_server.port + 1}"])
    assert reason_of(f, image_server.url("/img.png")).reason == "private_address"
    assert connects == []


@pytest.mark.parametrize(
    "path, reason, transient",
    [
        ("/404", "not_found", False),
        ("/500", "http_unavailable", True),
        ("/429", "http_unavailable", True),
        ("/text", "bad_content", False),
        ("/big", "too_large", False),
        ("/big-stream", "too_large", False),
        ("/loop", "too_many_redirects", False),
    ],
)
def test_http_failures(image_server, connects, path, reason, transient):
    e = reason_of(fetcher_for(image_server, max_redirects=2), image_server.url(path))
    assert (e.reason, e.transient) == (reason, transient), e


def test_oversized_body_is_refused_from_content_length(image_server):
    """/big announces 50 MiB: refused from the header, before the (short) body is read."""
    e = reason_of(fetcher_for(image_server), image_server.url("/big"))
    assert "Content-Length" in e.detail


def test_slow_server_times_out_as_transient(image_server):
    e = reason_of(fetcher_for(image_server, read_timeout_s=0.2), image_server.url("/slow"))
    assert e.reason == "timeout" and e.transient


def test_trickling_body_hits_total_deadline(image_server):
    f = fetcher_for(image_server, read_timeout_s=1.0, total_timeout_s=0.4)
    e = reason_of(f, image_server.url("/trickle"))
    assert e.reason == "timeout" and e.transient


@pytest.mark.parametrize("path", ["/trickle-headers", "/continue-forever"])
def test_the_total_timeout_bounds_the_whole_exchange_headers_included(image_server, path):
    """Headers at one byte per 0.2 s (each read well inside the read timeout), or ``100 Continue``
    for ever: the total deadline (0.6 s) ends the fetch, not the server (10 s)."""
    f = fetcher_for(image_server, read_timeout_s=5.0, total_timeout_s=0.6)
    t0 = time.monotonic()
    e = reason_of(f, image_server.url(path))
    assert time.monotonic() - t0 < 2.0
    assert e.reason == "timeout" and e.transient


def test_connection_refused_is_transient(connects):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    e = reason_of(ImageFetcher(allow=["127.0.0.0/8"], connect_timeout_s=0.5), f"http://127.0.0.1:{port}/x")
    assert e.reason == "connection" and e.transient


def test_redirect_to_same_allowed_origin_is_followed(image_server, connects):
    f = fetcher_for(image_server)
    assert f.fetch(image_server.url("/redirect?to=/img.png")) == PNG


@pytest.mark.parametrize(
    "target",
    [
        "http://10.0.0.1/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:10.0.0.1]/x.png",
        "http://100.64.0.1/x.png",
        "http://metadata.google.internal/computeMetadata/v1/",
    ],
)
def test_redirect_from_allowed_host_to_private_address_is_refused_without_connecting(
    image_server, connects, monkeypatch, target
):
    lookups: list[str] = []

    def resolver(host, port):
        lookups.append(host)
        raise AssertionError(f"no lookup expected for {host}")

    f = fetcher_for(image_server, resolver=resolver)
    e = reason_of(f, image_server.url(f"/redirect?to={target}"))
    assert e.reason == "private_address" and not e.transient
    # Only the (allowed) first hop was connected to; the private target never was.
    assert connects == [("127.0.0.1", image_server.port)]
    assert lookups == []


def test_redirect_to_name_resolving_private_is_refused_without_connecting(image_server, connects):
    f = fetcher_for(image_server, resolver=lambda host, port: ["10.9.8.7"])
    e = reason_of(f, image_server.url("/redirect?to=http://internal.example/x.png"))
    assert e.reason == "private_address" and "10.9.8.7" in e.detail
    assert connects == [("127.0.0.1", image_server.port)]


def test_bad_schemes_and_urls(image_server):
    f = fetcher_for(image_server)
    assert reason_of(f, "ftp://example.com/x.png").reason == "bad_scheme"
    assert reason_of(f, "gopher://example.com/x.png").reason == "bad_scheme"
    assert reason_of(f, "http://user:pw@example.com/x.png").reason == "bad_url"
    assert reason_of(f, "http:///x.png").reason == "bad_url"
    e = reason_of(f, image_server.url("/redirect?to=file:///etc/passwd"))
    assert e.reason == "bad_scheme"


# --- resolution level (stubbed resolver, stubbed connect for non-loopback) ------------------------


def test_name_is_resolved_once_and_connection_goes_to_the_vetted_ip(connects):
    """DNS rebinding: a second lookup would answer 127.0.0.1; there is none."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    lookups: list[str] = []

    def resolver(host, port):
        lookups.append(host)
        return next(answers)

    e = reason_of(ImageFetcher(resolver=resolver), "http://shop.example/img.png")
    assert e.reason == "connection"  # the stubbed connect refuses public addresses
    assert lookups == ["shop.example"]
    assert connects == [("93.184.216.34", 80)]


def test_one_private_answer_taints_the_whole_answer(connects):
    f = ImageFetcher(resolver=lambda h, p: ["93.184.216.34", "192.168.0.10"])
    assert reason_of(f, "https://shop.example/img.png").reason == "private_address"
    assert connects == []


def test_all_public_answers_are_tried_in_order(connects):
    f = ImageFetcher(resolver=lambda h, p: ["93.184.216.34", "2606:2800:220:1::1"])
    assert reason_of(f, "http://shop.example:8080/img.png").reason == "connection"
    assert connects == [("93.184.216.34", 8080), ("2606:2800:220:1::1", 8080)]


def test_host_header_keeps_the_name_when_connecting_to_the_vetted_ip(image_server, connects):
    f = ImageFetcher(resolver=lambda h, p: ["127.0.0.1"], allow=[f"shop.test:{image_server.port}"])
    assert f.fetch(f"http://shop.test:{image_server.port}/host") == PNG
    assert image_server.hosts[-1] == f"shop.test:{image_server.port}"
    assert connects == [("127.0.0.1", image_server.port)]


def test_allowed_name_does_not_open_metadata_endpoints(connects):
    f = ImageFetcher(resolver=lambda h, p: ["169.254.169.254"], allow=["store.internal"])
    assert reason_of(f, "http://store.internal/x.png").reason == "private_address"
    f2 = ImageFetcher(resolver=lambda h, p: ["10.1.2.3"], allow=["store.internal"])
    assert reason_of(f2, "http://store.internal/x.png").reason == "connection"
    assert connects == [("10.1.2.3", 80)]


def test_dns_failures():
    def nxdomain(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def again(host, port):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    assert reason_of(ImageFetcher(resolver=nxdomain), "http://nope.example/x").reason == "dns"
    e = reason_of(ImageFetcher(resolver=again), "http://nope.example/x")
    assert e.reason == "dns_temporary" and e.transient


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1",
        "100.127.255.254", "169.254.169.254", "169.254.10.10", "0.0.0.0", "224.0.0.1",
        "239.255.255.250", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1",
        "fd12:3456::1", "fd00:ec2::254", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
        "::ffff:10.0.0.1", "2002:a00:1::", "64:ff9b::a00:1", "fec0::1",
    ],
)
def test_non_public_addresses_are_refused(ip):
    assert address_refusal(ipaddress.ip_address(ip)) is not None


@pytest.mark.parametrize("net", [n for n, _ in SPECIAL_PURPOSE], ids=str)
def test_every_iana_special_purpose_range_is_refused_at_both_ends(net):
    """``ipaddress.is_global`` calls some of these global (192.0.0.8, 192.31.196.1, 2001:1::1 ...);
    the IANA registries list them as special-purpose, and an image fetcher has no business there."""
    for ip in (net.network_address, net.broadcast_address):
        assert address_refusal(ip) is not None, ip


@pytest.mark.parametrize("ip", ["192.0.0.8", "192.0.0.9", "192.0.0.170", "192.31.196.1", "192.52.193.1",
                                "192.175.48.1", "2001:1::1", "2001:4:112::1", "2620:4f:8000::1", "3fff::1"])
def test_addresses_python_calls_global_but_iana_does_not_are_refused(ip):
    assert address_refusal(ipaddress.ip_address(ip)) is not None


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:2800:220:1::1", "::ffff:8.8.8.8"])
def test_public_addresses_pass(ip):
    assert address_refusal(ipaddress.ip_address(ip)) is None


def test_allow_rules_parse():
    assert AllowRule.parse("10.0.0.0/8").network == ipaddress.ip_network("10.0.0.0/8")
    assert AllowRule.parse("127.0.0.1:9000") == AllowRule(
        network=ipaddress.ip_network("127.0.0.1/32"), port=9000
    )
    assert AllowRule.parse("[::1]:9000").port == 9000
    assert AllowRule.parse("fd00::/8").network is not None
    assert AllowRule.parse("Minio.Internal.:9000") == AllowRule(host="minio.internal", port=9000)
    with pytest.raises(ValueError):
        ImageFetcher(allow=[""])


def test_ipv4_mapped_loopback_is_not_covered_by_an_ipv4_allow_rule(connects):
    f = ImageFetcher(allow=["127.0.0.1"])
    assert reason_of(f, "http://[::ffff:127.0.0.1]:9/x.png").reason == "private_address"
    assert connects == []


# --- local refs (object keys and paths) -----------------------------------------------------------


@pytest.fixture
def object_root(tmp_path):
    root = tmp_path / "objects"
    (root / "shop").mkdir(parents=True)
    (root / "shop" / "a.jpg").write_bytes(JPEG)
    (tmp_path / "secret.jpg").write_bytes(JPEG)
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "dir-escape").symlink_to(tmp_path)
    (root / "inner.jpg").symlink_to(root / "shop" / "a.jpg")
    return root


def test_object_keys_and_paths_resolve_under_the_object_root(object_root):
    f = ImageFetcher(object_root=object_root, local_refs=True)
    assert f.fetch("shop/a.jpg") == JPEG
    assert f.fetch(str(object_root / "shop" / "a.jpg")) == JPEG  # an absolute path inside is fine
    assert f.fetch("inner.jpg") == JPEG  # a symlink that stays inside too
    assert f.public_ref(str(object_root / "shop" / "a.jpg")) == "shop/a.jpg"


@pytest.mark.parametrize("ref", ["/etc/passwd", "/proc/self/environ", "../secret.jpg", "shop/../../secret.jpg",
                                 "escape.jpg", "dir-escape/secret.jpg", "/"])
def test_refs_resolving_outside_the_object_root_are_refused(object_root, ref):
    e = reason_of(ImageFetcher(object_root=object_root, local_refs=True), ref)
    assert e.reason == "outside_object_root" and not e.transient
    assert str(object_root.parent) not in e.detail  # the reason names the ref, not where it led


@pytest.mark.parametrize("ref", ["file:///etc/passwd", "FILE:///etc/passwd", "file://localhost/etc/passwd"])
def test_file_urls_are_refused_even_with_local_refs_on(object_root, ref):
    assert reason_of(ImageFetcher(object_root=object_root, local_refs=True), ref).reason == "bad_scheme"


@pytest.mark.parametrize("settings", [{"local_refs": False}, {"local_refs": True, "object_root": None}])
def test_without_local_refs_no_file_is_read(object_root, settings):
    f = ImageFetcher(**{"object_root": object_root, **settings})
    for ref in ("shop/a.jpg", str(object_root / "shop" / "a.jpg")):
        assert reason_of(f, ref).reason == "local_refs_disabled"


def test_local_refs_follow_the_environment_unless_configured(monkeypatch, tmp_path):
    from tongkuan.config import WorkerConfig, load

    monkeypatch.setenv("TONGKUAN_FETCH__OBJECT_ROOT", str(tmp_path))
    for env, explicit, expected in (("production", None, False), ("development", None, True),
                                    ("production", "true", True), ("development", "false", False)):
        monkeypatch.setenv("TONGKUAN_ENVIRONMENT", env)
        if explicit is None:
            monkeypatch.delenv("TONGKUAN_FETCH__LOCAL_REFS", raising=False)
        else:
            monkeypatch.setenv("TONGKUAN_FETCH__LOCAL_REFS", explicit)
        assert load(WorkerConfig).fetch.local_refs is expected, (env, explicit)
