"""A DICOMweb server as predict's source and sink: QIDO-RS to search, WADO-RS to retrieve, STOW-RS to store.

:class:`DicomwebSource` wraps ``dicomweb-client`` (the ``pacs`` extra) and turns every transport
fault into the toolkit's own errors: a server that cannot be reached or that refuses the
credentials is a :class:`ServerError` (exit code :data:`~kidney_edge.runtime.rows.EXIT_SERVER`);
a study the server does not hold, or an instance whose retrieve fails (a response cut
mid-stream included), is an error row keyed by its URL, as an unreadable file is in a folder run.

Credentials come from ``--token`` or :data:`TOKEN_ENV`, are sent in the ``Authorization`` header
only, and never appear in a message: a token ``user:password`` is HTTP Basic (Orthanc's
``RegisteredUsers``), any other a bearer token.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from kidney_edge.errors import ImageReadError, InputError, KidneyEdgeError
from kidney_edge.runtime.rows import EXIT_SERVER

log = logging.getLogger(__name__)

SCHEME = "dicomweb+"  # predict's source spelling: dicomweb+http://host:port/dicom-web
TOKEN_ENV = "KIDNEY_EDGE_DICOMWEB_TOKEN"
TIMEOUT_S = 30.0  # one request; a WADO-RS retrieve of one CT slice takes milliseconds on a LAN
LISTING_REQUESTS = 8  # studies searched side by side (the server answers each from its index)
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
T = TypeVar("T")


class ServerError(KidneyEdgeError):
    """The DICOMweb server could not be reached, or it refused the request as a whole."""

    exit_code = EXIT_SERVER


def is_dicomweb(source: str) -> bool:
    """Whether predict's FOLDER argument names a DICOMweb server rather than a folder."""
    return str(source).lower().startswith(SCHEME)


def server_url(source: str) -> str:
    """``dicomweb+http://host:port/dicom-web`` -> ``http://host:port/dicom-web``; InputError otherwise.

    No message repeats the source: it may hold a password or a token, in any spelling."""
    url = str(source)
    url = url[len(SCHEME) :] if is_dicomweb(url) else url
    url = url.rstrip("/")
    if re.match(r"^(?:[a-z][a-z0-9+.-]*:)?/*[^/]*@", url, re.IGNORECASE):  # an @ in the authority
        raise InputError(f"put no credentials in the DICOMweb address; pass --token or set {TOKEN_ENV}")
    if "?" in url or "#" in url:  # a token there would be in every row's path
        raise InputError(
            "the DICOMweb address may not carry a query string (?...); pass a token with --token or "
            f"set {TOKEN_ENV}"
        )
    match = re.match(r"^(https?)(://[^/\s]+(/\S*)?)$", url, re.IGNORECASE)
    if match is None:
        raise InputError(
            "the address is not a DICOMweb address; write dicomweb+http://HOST:PORT/ROOT, "
            "e.g. dicomweb+http://127.0.0.1:8042/dicom-web"
        )
    return match.group(1).lower() + match.group(2)


@dataclass(frozen=True)
class Selection:
    """Which studies to read (``--study``, ``--since``) and which series of them (``--modality``)."""

    studies: tuple[str, ...] = ()
    since: str | None = None  # StudyDate on or after, YYYYMMDD
    modality: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "studies", tuple(dict.fromkeys(str(uid).strip() for uid in self.studies)))
        for uid in self.studies:
            if not _UID.match(uid) or len(uid) > 64:
                raise InputError(
                    f"--study {uid!r} is not a DICOM UID (digits and dots, at most 64 characters)"
                )
        if self.since is not None:
            match = _DATE.match(str(self.since).strip())
            if match is None:
                raise InputError(f"--since must be a date such as 2026-01-31 or 20260131, got {self.since!r}")
            object.__setattr__(self, "since", "".join(match.groups()))
        if self.modality is not None:
            object.__setattr__(self, "modality", str(self.modality).strip().upper())
        if not self.studies and self.since is None:
            raise InputError(
                "a DICOMweb source needs --study UID (one or more) or --since DATE to pick studies"
            )


@dataclass(frozen=True)
class Instance:
    """One instance to classify: its row key (WADO-RS URL), UIDs and header (metadata, no pixels)."""

    key: str
    study_uid: str
    series_uid: str
    sop_uid: str
    header: Any  # pydicom.Dataset from WADO-RS metadata


@dataclass
class Listing:
    """What a selection found: instances in server order, and studies the server does not hold."""

    instances: dict[str, Instance] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # study key -> why it has no instance
    not_images: int = 0  # instances without pixels (SRs such as our own results): not listed

    @property
    def keys(self) -> list[str]:
        return [*self.missing, *self.instances]


def _root_cause(exc: BaseException) -> str:
    """The innermost error's type under requests' and urllib3's wrappers, e.g. ConnectionRefusedError."""
    cause: object = exc
    for _ in range(5):
        inner = getattr(cause, "reason", None) or (cause.args[0] if getattr(cause, "args", None) else None)
        if not isinstance(inner, BaseException):
            break
        cause = inner
    return type(cause).__name__


def _authorization(token: str) -> str:
    if ":" in token:
        return "Basic " + base64.b64encode(token.encode("utf-8")).decode("ascii")
    return f"Bearer {token}"


def _value(element: dict[str, Any] | None) -> Any:
    values = (element or {}).get("Value") or [None]
    return values[0]


class DicomwebSource:
    """One DICOMweb server: search, retrieve and store, with faults as the toolkit's errors."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
        try:
            import requests
            from dicomweb_client.api import DICOMwebClient
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry
        except ImportError:
            raise InputError(
                "reading from a DICOMweb server needs: pip install 'kidney-edge[pacs]'"
            ) from None
        self.url = server_url(url)
        session = requests.Session()
        # A pooled keep-alive connection the server has just closed fails a request that never
        # reached it: searches and retrieves (GET, idempotent) are tried again, twice at most.
        # A store (POST) is never repeated by the transport.
        retry = Retry(
            total=2, connect=2, read=2, status=0, allowed_methods=frozenset({"GET"}), backoff_factor=0.1
        )
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=LISTING_REQUESTS + 2)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if token:
            session.headers["Authorization"] = _authorization(token)
        self._session = session
        self._client = DICOMwebClient(self.url, session=session, timeout=timeout_s)
        # A retry of a refused or failed request only delays the message: faults are reported, not hidden.
        self._client.set_http_retry_params(retry=False)

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    # ------------------------------------------------------------------ faults

    @contextmanager
    def _faults(self, what: str) -> Iterator[None]:
        """Transport faults and refusals of the whole server as :class:`ServerError`, one line each."""
        import requests

        try:
            yield
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                raise ServerError(
                    f"the DICOMweb server {self.url} refused {what} (HTTP {status}): the credentials are "
                    f"missing or wrong; pass --token or set {TOKEN_ENV}"
                ) from None
            raise ServerError(f"the DICOMweb server {self.url} answered HTTP {status} to {what}") from None
        except requests.Timeout:
            raise ServerError(f"the DICOMweb server {self.url} did not answer {what} in time") from None
        except requests.ConnectionError as exc:
            raise ServerError(
                f"cannot reach the DICOMweb server {self.url} ({what}; {_root_cause(exc)}): is it running, "
                "and is the address right?"
            ) from None
        # Anything else of requests (a cut stream, an invalid URL, a redirect loop, a body that is
        # not JSON such as a login page) or of the client's parsing (ValueError): no usable answer.
        except (requests.RequestException, ValueError) as exc:
            wrong_address = isinstance(exc, requests.JSONDecodeError | requests.exceptions.InvalidURL)
            hint = ": is the address its DICOMweb root?" if wrong_address else ""
            raise ServerError(
                f"the DICOMweb server {self.url} gave no usable answer to {what} ({type(exc).__name__}){hint}"
            ) from None

    def _call(self, what: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._faults(what):
            return function(*args, **kwargs)

    # ------------------------------------------------------------------ search

    def study_key(self, study_uid: str) -> str:
        return f"{self.url}/studies/{study_uid}"

    def list(self, selection: Selection) -> Listing:
        """The instances of the selected studies (QIDO-RS), each with its WADO-RS metadata, in
        study, series, InstanceNumber order. Studies are searched :data:`LISTING_REQUESTS` at a
        time: the listing is a few small requests per study, each mostly waiting on the server."""
        listing = Listing()
        studies = self._study_uids(selection, listing)
        with ThreadPoolExecutor(LISTING_REQUESTS, thread_name_prefix="kidney-edge-qido") as pool:
            found_series = pool.map(partial(self._study_headers, selection), studies)
            for study_uid, series in zip(studies, found_series, strict=True):
                for series_uid, headers in series:
                    self._add_series(listing, study_uid, series_uid, headers)
        found = len({instance.study_uid for instance in listing.instances.values()})
        log.info("%d images in %d studies (%d non-image instances left out), %d studies missing",
                 len(listing.instances), found, listing.not_images, len(listing.missing))  # fmt: skip
        return listing

    def _study_headers(self, selection: Selection, study_uid: str) -> list[tuple[str, list[Any]]]:
        """(SeriesInstanceUID, instance headers) of each series of a study (QIDO-RS, WADO-RS metadata)."""
        filters = {"Modality": selection.modality} if selection.modality else None
        series = self._call(f"the series search of study {study_uid}", self._client.search_for_series,
                            study_uid, search_filters=filters, get_remaining=True)  # fmt: skip
        uids = [uid for uid in (_value(found.get("0020000E")) for found in series) if uid]
        return [(uid, self._series_headers(study_uid, uid)) for uid in uids]

    def _study_uids(self, selection: Selection, listing: Listing) -> list[str]:
        base: dict[str, Any] = {"StudyDate": f"{selection.since}-"} if selection.since else {}
        if not selection.studies:
            found = self._call("the study search", self._client.search_for_studies, search_filters=base,
                               get_remaining=True)  # fmt: skip
            return [uid for uid in (_value(study.get("0020000D")) for study in found) if uid]
        uids = []
        for uid in selection.studies:
            found = self._call(f"the search for study {uid}", self._client.search_for_studies,
                               search_filters={**base, "StudyInstanceUID": uid}, get_remaining=True)  # fmt: skip
            if found:
                uids.append(uid)
            else:
                since = f" with a StudyDate on or after {selection.since}" if selection.since else ""
                listing.missing[self.study_key(uid)] = (
                    f"study {uid} not found on {self.url}{since} (QIDO-RS: no match)"
                )
        return uids

    def _series_headers(self, study_uid: str, series_uid: str) -> list[Any]:
        import pydicom

        what = f"the metadata of series {series_uid}"
        with self._faults(what):  # a malformed DICOM JSON answer is the server's fault too
            metadata = self._client.retrieve_series_metadata(study_uid, series_uid)
            # Bulk data (pixels) is not in the metadata, only a URI to it: the header is what is read.
            headers = [
                pydicom.Dataset.from_json({tag: el for tag, el in item.items() if "BulkDataURI" not in el})
                for item in metadata
            ]
        headers.sort(key=lambda ds: (int(ds.get("InstanceNumber") or 0), str(ds.get("SOPInstanceUID", ""))))
        return headers

    def _add_series(self, listing: Listing, study_uid: str, series_uid: str, headers: list[Any]) -> None:
        for header in headers:
            if "Rows" not in header:  # an SR, key object or presentation state: no image to classify
                listing.not_images += 1
                continue
            sop_uid = str(header.get("SOPInstanceUID", ""))
            key = f"{self.url}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
            listing.instances[key] = Instance(key, study_uid, series_uid, sop_uid, header)

    # ------------------------------------------------------------------ retrieve

    def retrieve(self, instance: Instance) -> bytes:
        """One instance's Part 10 bytes (WADO-RS); ImageReadError when it cannot be had."""
        try:
            with self._faults(f"the retrieve of instance {instance.sop_uid}"):
                dataset = self._client.retrieve_instance(
                    instance.study_uid, instance.series_uid, instance.sop_uid
                )
            return part10(dataset)
        except ServerError as exc:
            raise ImageReadError(instance.key, f"retrieve failed: {exc}") from None
        # A response cut mid-stream fails in requests, urllib3 or the multipart parser, by many types.
        except Exception as exc:
            raise ImageReadError(instance.key, f"retrieve failed ({type(exc).__name__}: {exc})") from None

    def retrieve_series(self, study_uid: str, series_uid: str) -> dict[str, Any]:
        """Every instance of a series in one WADO-RS request, {SOPInstanceUID: pydicom Dataset};
        raises for any fault (a response cut mid-stream included)."""
        with self._faults(f"the retrieve of series {series_uid}"):
            datasets = self._client.retrieve_series(study_uid, series_uid)
        return {str(ds.SOPInstanceUID): ds for ds in datasets}

    # ------------------------------------------------------------------ store

    def instance_uids(self, study_uid: str, modality: str) -> set[str]:
        """SOPInstanceUIDs of the study's instances of ``modality`` (QIDO-RS)."""
        found = self._call(f"the {modality} search of study {study_uid}", self._client.search_for_instances,
                           study_uid, search_filters={"Modality": modality}, get_remaining=True)  # fmt: skip
        return {uid for uid in (_value(item.get("00080018")) for item in found) if uid}

    def store(self, study_uid: str, datasets: Sequence[Any]) -> None:
        """STOW-RS ``datasets`` into their study; ServerError when the server rejects any of them."""
        response = self._call(f"the store into study {study_uid}", self._client.store_instances,
                              list(datasets), study_uid)  # fmt: skip
        failed = getattr(response, "FailedSOPSequence", None) or []
        if failed:
            reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')}: failure reason "
                                f"{item.get('FailureReason', '?')}" for item in failed)  # fmt: skip
            raise ServerError(
                f"the DICOMweb server {self.url} rejected the store into study {study_uid} ({reasons})"
            )


def part10(dataset: Any) -> bytes:
    """A pydicom Dataset as DICOM Part 10 bytes, in memory: what a file of it would hold."""
    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=False)
    return buffer.getvalue()


@dataclass
class _SeriesFetch:
    lock: threading.Lock = field(default_factory=threading.Lock)
    instances: dict[str, Any] | None = None  # SOPInstanceUID -> Dataset, once retrieved


class SeriesReader:
    """The :data:`~kidney_edge.runtime.predict.Reader` of a listing: a row key -> the
    instance's Part 10 bytes, in memory only; ImageReadError when it cannot be had.

    A series is retrieved whole, in one WADO-RS request, by the first worker that asks for one
    of its instances (the others wait for it), and each instance is handed out once: per
    instance, Orthanc answered a request in 49.7 ms, a whole series in 2.3 ms per instance
    (benchmarks/results/pacs.md). :meth:`expect` says which instances will be asked for, so a
    series is dropped from memory once its last one is read (at most the series in flight are
    held). A series whose retrieve fails falls back to one request per instance, so each
    instance gets its own row: predicted, or an error saying why.
    """

    def __init__(self, source: DicomwebSource, listing: Listing) -> None:
        self._source, self._listing = source, listing
        self._lock = threading.Lock()
        self._fetches: dict[tuple[str, str], _SeriesFetch] = {}
        self._wanted: dict[tuple[str, str], set[str]] = {}

    def expect(self, keys: Sequence[str]) -> None:
        for key in keys:
            instance = self._listing.instances.get(key)
            if instance is not None:
                self._wanted.setdefault((instance.study_uid, instance.series_uid), set()).add(
                    instance.sop_uid
                )

    def __call__(self, key: str) -> bytes:
        if key in self._listing.missing:
            raise ImageReadError(key, self._listing.missing[key])
        instance = self._listing.instances[key]
        series = (instance.study_uid, instance.series_uid)
        with self._lock:
            fetch = self._fetches.setdefault(series, _SeriesFetch())
            whole = len(self._wanted.get(series, ())) > 1
        with fetch.lock:  # the first reader of a series retrieves it; the others wait here
            if fetch.instances is None:
                fetch.instances = self._retrieve(series) if whole else {}
        with self._lock:
            dataset = fetch.instances.pop(instance.sop_uid, None)
            wanted = self._wanted.get(series, set())
            wanted.discard(instance.sop_uid)
            if not wanted:
                self._fetches.pop(series, None)
        return self._source.retrieve(instance) if dataset is None else part10(dataset)

    def _retrieve(self, series: tuple[str, str]) -> dict[str, Any]:
        try:
            return self._source.retrieve_series(*series)
        except Exception as exc:  # a cut stream fails by many types; each instance is tried alone
            log.warning("series %s: %s; retrieving its instances one by one", series[1], exc)
            return {}
