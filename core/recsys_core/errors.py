"""Domain exceptions shared by every stage. Each builds its own message."""

from __future__ import annotations


class RecsysError(Exception):
    """Base class of every error the platform raises on purpose."""


class SettingsError(RecsysError):
    """A configuration value is invalid or unknown."""


class ContractError(RecsysError):
    """Data does not have the columns or types a contract requires."""

    def __init__(self, contract: str, missing: list[str]) -> None:
        super().__init__(
            f"{contract}: missing required columns {sorted(missing)}; "
            "check the producer against recsys_core.contracts"
        )
        self.contract = contract
        self.missing = missing


class DatasetNotFoundError(RecsysError):
    """An input dataset is not where the caller said it is."""

    def __init__(self, path: str, hint: str) -> None:
        super().__init__(f"dataset not found at {path}: {hint}")
        self.path = path


class InvalidRequestError(RecsysError):
    """A serving request was refused before it reached the model (HTTP ``status``)."""

    def __init__(self, reasons: list[str], status: int = 422) -> None:
        super().__init__("invalid request: " + "; ".join(reasons))
        self.reasons = reasons
        self.status = status
