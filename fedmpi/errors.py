"""Which exceptions are the user's to fix (shown as one clear line) rather than bugs (traceback too)."""


def is_user_error(exc: BaseException) -> bool:
    from .attack import AttackError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .encoding import EncodingError
    from .report import ReportError
    from .server import PayloadError
    from .training import DeviceError
    from .wire import PeerLost, RoundTimeout

    return isinstance(exc, (ConfigError, DataError, EncodingError, PayloadError, DeviceError, RoundTimeout, PeerLost,
                            CheckpointError, AttackError, ReportError, KeyboardInterrupt))
