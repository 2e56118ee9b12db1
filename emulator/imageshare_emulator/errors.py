"""The errors the emulator answers with, spelled like ECS spells them."""

from __future__ import annotations


class ApiError(Exception):
    """An ECS error response: HTTP status, ``Code`` and ``Message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message


def missing_parameter(name: str) -> ApiError:
    # The stray space before the closing quote is in ECS's own message; clients match it.
    return ApiError(
        400,
        "MissingParameter",
        f'The input parameter "{name} "that is mandatory for processing this request '
        "is not supplied.",
    )


def invalid_parameter(name: str, value: str) -> ApiError:
    return ApiError(
        400, "InvalidParameter", f'The specified parameter "{name}" is not valid: {value!r}.'
    )


def incomplete_signature(detail: str) -> ApiError:
    return ApiError(
        400,
        "IncompleteSignature",
        f"The request signature does not conform to Aliyun standards. {detail}",
    )


def signature_does_not_match(string_to_sign: str) -> ApiError:
    return ApiError(
        400,
        "SignatureDoesNotMatch",
        "Specified signature is not matched with our calculation. "
        f"server string to sign is:{string_to_sign}",
    )


def throttled() -> ApiError:
    return ApiError(400, "Throttling.User", "Request was denied due to user flow control.")


ACCESS_KEY_NOT_FOUND = ApiError(
    404, "InvalidAccessKeyId.NotFound", "Specified access key is not found."
)
NONCE_USED = ApiError(400, "SignatureNonceUsed", "Specified signature nonce was used already.")
TIMESTAMP_EXPIRED = ApiError(
    400,
    "InvalidTimeStamp.Expired",
    "Specified time stamp or date value is expired.",
)
ILLEGAL_TIMESTAMP = ApiError(
    400,
    "IllegalTimestamp",
    'The input parameter "Timestamp" that is mandatory for processing this request '
    "is not supplied or is not in the format yyyy-MM-ddTHH:mm:ssZ.",
)
ACTION_NOT_FOUND = ApiError(
    404, "InvalidAction.NotFound", "Specified api is not found, please check your url and method."
)
INVALID_VERSION = ApiError(400, "InvalidVersion", "Specified parameter Version is not valid.")
TOKEN_MISMATCH = ApiError(
    400,
    "InvalidSecurityToken.MismatchWithAccessKey",
    "The security token you provided does not match the access key.",
)
TOKEN_EXPIRED = ApiError(400, "InvalidSecurityToken.Expired", "Specified SecurityToken is expired.")
REGION_NOT_FOUND = ApiError(
    404, "InvalidRegionId.NotFound", "The specified RegionId does not exist."
)
IMAGE_NOT_FOUND = ApiError(404, "InvalidImageId.NotFound", "The specified ImageId does not exist.")
SERVICE_UNAVAILABLE = ApiError(
    503, "ServiceUnavailable", "The request has failed due to a temporary failure of the server."
)
INTERNAL_ERROR = ApiError(
    500, "InternalError", "The request processing has failed due to some unknown error."
)
