"""edgeprune device agent: runs one exported model on this device and reports what it measured.

The wire contract (job spec in, report out, both versioned JSON) is written in :mod:`agent.schema`; read that
module's docstring first. The agent depends only on numpy, psutil and the device's own runtime (imported lazily
by its backend); it never imports torch, pandas, pydantic, ``host`` or ``edgeprune``.

Commands (``python -m agent ...``)::

    run JOB.json [--out REPORT.json]   run a job; report JSON to --out (written atomically) or stdout
                                       exit 0 ok, 1 job ran but failed (report has status "error"),
                                       2 bad job spec or usage (one line on stderr naming file and field)
    probe [--json]                     describe this device: identity, firmware, runtimes, power sensors
    lease acquire|renew|release|show --dir DIR [--holder JSON] [--ttl S] [--token T] [--request ID]
                                       this device's exclusive lease (see agent.lease); prints JSON
    --version                          print the agent version

Modules: ``runner`` (one job, phase by phase), ``runtimes`` (backend registry; one module per backend, base
classes in ``runtimes.base``), ``timing`` (protocol and statistics), ``power`` (sensor registry; one module per
sensor, base class in ``power.base``), ``thermal`` (temperature and throttling sources), ``sysfs`` (reading sysfs
files), ``accuracy`` (eval shard), ``probe`` (device identity), ``lease`` (exclusive device leases), ``registry``,
``cli``. The exception classes below are the agent's only ones.
"""

__version__ = "0.1.0"


class AgentError(Exception):
    """Base class of every error the agent raises on purpose; ``type(e).__name__`` goes into the report."""


class ArtifactError(AgentError):
    """An artifact or eval shard is missing, escapes the job folder, or does not match its sha256."""


class RuntimeBackendError(AgentError):
    """A runtime is unknown, not installed, misconfigured, or the model does not match the job's input spec."""


class SensorError(AgentError):
    """A power sensor is unknown, misconfigured, or failed while reading."""


class EvalDataError(AgentError):
    """The eval shard's arrays have the wrong names, shapes or dtypes, or the model's output cannot be scored."""


class JobTimeout(AgentError):
    """The job's ``timeout_s`` ran out."""
