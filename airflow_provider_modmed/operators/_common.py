"""What every ModMed operator shares: the hook, the capability pre-flight, PHI-safe rendered templates,
fail-fast on errors a retry cannot fix, and OpenLineage datasets.

PHI and rendered templates: Airflow stores every template field's rendered value (the task's
"Rendered Template" view). Fields that can hold patient data (a resource being written, search values,
``If-None-Exist`` identifiers) are listed in ``phi_template_fields``: they are rendered as usual, the
operator keeps the rendered value for ``execute``, and the stored value shows only the shape (keys,
``resourceType``, ``id``, search parameters starting with ``_``) with every other value as ``***``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from airflow.sdk import BaseOperator

from airflow_provider_modmed.capabilities import Capabilities, Interaction, ResourceSpec, Track
from airflow_provider_modmed.errors import (
    CapabilityError,
    ConfigurationError,
    ModMedError,
    ValidationError,
)
from airflow_provider_modmed.hooks.modmed import ModMedHook

if TYPE_CHECKING:
    import jinja2
    from airflow.sdk import Context, ObjectStoragePath

log = logging.getLogger(__name__)

T = TypeVar("T")

#: what the rendered-template view shows instead of a value that may be patient data
MASK = "***"
#: keys whose values are shown in rendered templates (not patient data)
_SHOWN_KEYS = frozenset({"resourceType", "id", "system", "use", "url"})
#: errors no retry can fix: the task fails at once instead of spending its retries
FAIL_FAST: tuple[type[ModMedError], ...] = (ConfigurationError, CapabilityError, ValidationError)


#: where operators write when no output path is given and ``[modmed] output_base`` is unset
DEFAULT_OUTPUT_BASE = "file:///tmp/modmed"


def output_base(override: str | None = None) -> str:
    """``override``, else ``[modmed] output_base``, else ``file:///tmp/modmed``; without a trailing slash."""
    if override:
        return str(override).rstrip("/")
    from airflow.sdk import conf

    return str(conf.get("modmed", "output_base", fallback=DEFAULT_OUTPUT_BASE)).rstrip("/")


def masked_shape(value: Any, *, show_underscore_keys: bool = False, _depth: int = 0) -> Any:
    """``value`` with its structure kept and its values masked (see the module docstring)."""
    if _depth > 12:
        return MASK
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key)
            if (name in _SHOWN_KEYS or (show_underscore_keys and name.startswith("_"))) and \
                    isinstance(item, (str, int, float, bool)):
                out[name] = item
            else:
                out[name] = masked_shape(item, show_underscore_keys=show_underscore_keys, _depth=_depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(i, (list, tuple)) and len(i) == 2 and isinstance(i[0], str) for i in value):
            # a list of (name, value) search pairs
            return [[k, v if show_underscore_keys and k.startswith("_") else MASK] for k, v in value]
        return [masked_shape(i, show_underscore_keys=show_underscore_keys, _depth=_depth + 1) for i in value]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and _depth == 0:
        text = value.strip()
        if text[:1] in ("{", "["):
            try:
                return masked_shape(json.loads(text), show_underscore_keys=show_underscore_keys, _depth=1)
            except ValueError:
                return MASK
        if show_underscore_keys and "=" in text:
            return _masked_query(text)
    return MASK


def _masked_query(text: str) -> str:
    """A query string with the parameter names kept (when they look like names) and the values masked."""
    import re
    from urllib.parse import parse_qsl

    parts = []
    for key, val in parse_qsl(text.lstrip("?"), keep_blank_values=True):
        name = key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}", key) else MASK
        parts.append(f"{name}={val if name.startswith('_') else MASK}")
    return "&".join(parts) or MASK


def parse_json_arg(value: Any, name: str) -> Any:
    """A dict/list argument that templating may have turned into a JSON string."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("{", "["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                # the position, never the text: it may hold patient data
                raise ConfigurationError(f"{name} is not valid JSON (line {exc.lineno} column {exc.colno}); "
                                         "pass a dict or render it with render_template_as_native_obj=True"
                                         ) from None
    return value


def resource_summary(resource: Mapping[str, Any]) -> dict[str, Any]:
    """Type, id, version and last update of a resource: what operators return instead of the data."""
    meta = resource.get("meta") or {}
    return {"resource_type": resource.get("resourceType"), "id": resource.get("id"),
            "version_id": meta.get("versionId"), "last_updated": meta.get("lastUpdated")}


class ModMedBaseOperator(BaseOperator):
    """Base of the ModMed operators.

    :param modmed_conn_id: the ModMed connection (one per practice and track). Default ``modmed_default``.
    """

    template_fields: Sequence[str] = ("modmed_conn_id",)
    template_fields_renderers: ClassVar[dict[str, str]] = {}
    #: template fields that may hold patient data (see the module docstring)
    phi_template_fields: Sequence[str] = ()
    ui_color = "#e8f1fb"
    ui_fgcolor = "#0b3d6e"

    def __init__(self, *, modmed_conn_id: str = ModMedHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.modmed_conn_id = modmed_conn_id

    # -- hook and capabilities ---------------------------------------------------------------------
    @cached_property
    def hook(self) -> ModMedHook:
        return ModMedHook(self.modmed_conn_id)

    @property
    def track(self) -> Track:
        return self.hook.track

    @property
    def capabilities(self) -> Capabilities:
        return self.hook.config.capabilities

    def preflight(self, resource_type: Any, interaction: Interaction) -> ResourceSpec:
        """The capability check for this connection's track; raises before any request."""
        if not isinstance(resource_type, str) or not resource_type:
            raise ConfigurationError("resource_type is required (a FHIR resource type such as 'Patient')")
        return self.capabilities.check(self.track, resource_type, interaction)

    def on_kill(self) -> None:
        """Close the client (and its connections) of a killed task."""
        self._close_client()

    def _close_client(self) -> None:
        hook = self.__dict__.get("hook")
        if hook is not None:
            hook.close()

    @contextmanager
    def fail_fast(self) -> Iterator[None]:
        """Turn errors that a retry cannot fix into ``AirflowFailException`` (no retries spent)."""
        try:
            yield
        except FAIL_FAST as exc:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc

    def task_folder(self, context: Context) -> str:
        """``{run_id}/{task_id}[_{map_index}]``, each segment path-safe: the folder of one task instance
        below an output base (every try of the instance shares it, so a retry finds what an earlier try left)."""
        ti = context.get("ti")
        map_index = getattr(ti, "map_index", None)
        run_id = context.get("run_id") or getattr(ti, "run_id", None) or "run"
        task = safe_segment(self.task_id) + (f"_{map_index}" if map_index not in (None, -1) else "")
        return f"{safe_segment(run_id)}/{task}"

    def run_closing(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` and close the client afterwards, whatever happens (the hook keeps its config)."""
        try:
            return fn()
        finally:
            self._close_client()

    # -- rendered templates without patient data ---------------------------------------------------
    # Airflow's public ``render_template`` renders one template field's value per top-level call, for a
    # task and for each expansion of a mapped task alike (nested values are rendered by recursive calls).
    # A field in ``phi_template_fields`` keeps its rendered value here and hands Airflow the masked shape,
    # which is what Airflow stores as the rendered field. XCom values of a mapped task stay unrendered.
    def render_template(self, content: Any, context: Context, jinja_env: jinja2.Environment | None = None,
                        seen_oids: set[int] | None = None) -> Any:
        """Airflow's rendering; a value of a field in ``phi_template_fields`` comes back masked."""
        depth = self.__dict__.get("_phi_depth", 0)
        name = self._phi_field_of(content) if depth == 0 else None
        self.__dict__["_phi_depth"] = depth + 1
        try:
            rendered = super().render_template(content, context, jinja_env, seen_oids)
        finally:
            self.__dict__["_phi_depth"] = depth
        return rendered if name is None else self._keep_phi(name, rendered)

    def render_template_fields(self, context: Context, jinja_env: jinja2.Environment | None = None) -> None:
        """Render every template field, then mask the patient-data fields that were not rendered by
        :meth:`render_template` (a callable field value is called instead of rendered)."""
        super().render_template_fields(context, jinja_env)
        kept = self.__dict__.get("_phi_values") or {}
        for name in self.phi_template_fields:
            if name in self.template_fields and name not in kept:
                setattr(self, name, self._keep_phi(name, getattr(self, name, None)))

    def _phi_field_of(self, content: Any) -> str | None:
        """The patient-data field whose (not yet rendered) value ``content`` is, if any."""
        kept = self.__dict__.get("_phi_values") or {}
        for name in self.template_fields:
            if getattr(self, name, None) is content:
                return name if name in self.phi_template_fields and name not in kept else None
        return None

    def _keep_phi(self, name: str, value: Any) -> Any:
        """Keep ``value`` for :meth:`phi_value`; return its masked shape (empty values stay as they are)."""
        if value in (None, "", {}, []):
            return value
        self.__dict__.setdefault("_phi_values", {})[name] = value
        return masked_shape(value, show_underscore_keys=True)

    def phi_value(self, name: str) -> Any:
        """The real (rendered) value of a template field listed in ``phi_template_fields``."""
        kept = self.__dict__.get("_phi_values") or {}
        return kept[name] if name in kept else getattr(self, name)

    # -- OpenLineage --------------------------------------------------------------------------------
    def lineage_namespace(self) -> str:
        """``modmed://{host[:port]}/{firm}``: one OpenLineage namespace per practice."""
        import httpx

        config = self.hook.config
        url = httpx.URL(config.fhir_base)
        host = url.host + (f":{url.port}" if url.port else "")
        return f"modmed://{host}/{config.firm or '-'}"

    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(inputs, outputs) as (namespace, name) pairs; operators override."""
        return [], []

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Input and output datasets for the OpenLineage provider (None when it is not installed)."""
        try:
            from airflow.providers.common.compat.openlineage.facet import Dataset
            from airflow.providers.openlineage.extractors import OperatorLineage
        except ImportError:
            return None
        try:
            inputs, outputs = self.lineage_datasets()
        except ModMedError:
            return None
        return OperatorLineage(inputs=[Dataset(namespace=ns, name=name) for ns, name in inputs],
                               outputs=[Dataset(namespace=ns, name=name) for ns, name in outputs])


def storage_dataset(path: str) -> tuple[str, str]:
    """OpenLineage (namespace, name) of a file: ``file``/path, or ``{scheme}://{bucket}``/key."""
    from urllib.parse import urlsplit

    parts = urlsplit(path)
    if parts.scheme in ("", "file", "local"):
        return "file", parts.path or path
    bucket = parts.netloc.rsplit("@", 1)[-1]  # drop a conn_id given as s3://conn_id@bucket/key
    return f"{parts.scheme}://{bucket}", parts.path.lstrip("/")


def storage_path(url: str, conn_id: str | None = None) -> ObjectStoragePath:
    """An absolute local path or object-storage URL as an ``ObjectStoragePath`` (``conn_id`` for its storage)."""
    from airflow.sdk import ObjectStoragePath

    text = str(url)
    if "://" not in text:
        if not text.startswith("/"):
            raise ConfigurationError(f"output path {text!r} must be absolute or a URL (file://, s3://, gs://, ...)")
        text = "file://" + text
    return ObjectStoragePath(text, conn_id=conn_id) if conn_id else ObjectStoragePath(text)


def safe_segment(value: Any) -> str:
    """``value`` made safe as one path segment (dag ids, run ids, task ids, resource types)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(value)).strip("_") or "_"
