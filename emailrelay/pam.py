"""Password checks through Linux PAM (libpam.so.0), using ctypes.

`authenticate(user, password)` runs the PAM service's `auth` and `account`
stacks with a conversation function that answers every prompt with the
user name (echo on) or the password (echo off). `available()` says whether
libpam can be loaded; nothing here raises because libpam is missing except
`authenticate`, which raises PamUnavailable with a clear message. PAM modules
are not all thread-safe, so calls are serialised.
"""

import threading

SERVICE = "emailrelay"

_PAM_SUCCESS = 0
_PAM_BUF_ERR = 5
_PAM_CONV_ERR = 19
_PAM_PROMPT_ECHO_OFF = 1
_PAM_PROMPT_ECHO_ON = 2
_PAM_ERROR_MSG = 3
_PAM_TEXT_INFO = 4

_lock = threading.Lock()
_lib = None
_load_error = None


class PamUnavailable(Exception):
    """libpam (or libc) could not be loaded."""


def _load():
    """Loads libpam and libc once and declares the functions used; returns a namespace."""
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    import ctypes
    import ctypes.util
    try:
        libpam = ctypes.CDLL(ctypes.util.find_library("pam") or "libpam.so.0")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError as e:
        _load_error = str(e)
        return None

    class PamMessage(ctypes.Structure):
        _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]

    class PamResponse(ctypes.Structure):
        _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]

    conv_func = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int,
                                 ctypes.POINTER(ctypes.POINTER(PamMessage)),
                                 ctypes.POINTER(ctypes.POINTER(PamResponse)), ctypes.c_void_p)

    class PamConv(ctypes.Structure):
        _fields_ = [("conv", conv_func), ("appdata_ptr", ctypes.c_void_p)]

    libc.calloc.restype = ctypes.c_void_p
    libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.strdup.restype = ctypes.c_void_p
    libc.strdup.argtypes = [ctypes.c_char_p]
    libpam.pam_start.restype = ctypes.c_int
    libpam.pam_start.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(PamConv),
                                 ctypes.POINTER(ctypes.c_void_p)]
    libpam.pam_authenticate.restype = ctypes.c_int
    libpam.pam_authenticate.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libpam.pam_acct_mgmt.restype = ctypes.c_int
    libpam.pam_acct_mgmt.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libpam.pam_end.restype = ctypes.c_int
    libpam.pam_end.argtypes = [ctypes.c_void_p, ctypes.c_int]

    class Lib:
        pass
    lib = Lib()
    lib.ctypes = ctypes
    lib.pam = libpam
    lib.libc = libc
    lib.PamResponse = PamResponse
    lib.PamConv = PamConv
    lib.conv_func = conv_func
    _lib = lib
    return lib


def available():
    """True when libpam can be loaded on this system."""
    with _lock:
        return _load() is not None


def authenticate(user, password, service=None):
    """True when PAM `service` (default `SERVICE`) accepts `user` with `password`.

    Both the auth and the account stacks must succeed. Raises PamUnavailable
    when libpam cannot be loaded.
    """
    with _lock:
        lib = _load()
        if lib is None:
            raise PamUnavailable("PAM is not available: %s" % _load_error)
        return _authenticate(lib, user.encode("utf-8", "surrogateescape"),
                             password.encode("utf-8", "surrogateescape"),
                             (service or SERVICE).encode("utf-8"))


def _authenticate(lib, user, password, service):
    ctypes = lib.ctypes

    def conversation(count, messages, responses, _appdata):
        # PAM frees the answers with free(), so they come from libc's allocator.
        block = lib.libc.calloc(count, ctypes.sizeof(lib.PamResponse))
        if not block:
            return _PAM_BUF_ERR
        answers = ctypes.cast(block, ctypes.POINTER(lib.PamResponse))
        for i in range(count):
            style = messages[i].contents.msg_style
            if style == _PAM_PROMPT_ECHO_OFF:
                answers[i].resp = lib.libc.strdup(password)
            elif style == _PAM_PROMPT_ECHO_ON:
                answers[i].resp = lib.libc.strdup(user)
            elif style not in (_PAM_ERROR_MSG, _PAM_TEXT_INFO):
                return _PAM_CONV_ERR
        responses[0] = answers
        return _PAM_SUCCESS

    callback = lib.conv_func(conversation)
    conv = lib.PamConv(callback, None)
    handle = ctypes.c_void_p()
    rc = lib.pam.pam_start(service, user, ctypes.byref(conv), ctypes.byref(handle))
    if rc != _PAM_SUCCESS:
        return False
    try:
        rc = lib.pam.pam_authenticate(handle, 0)
        if rc == _PAM_SUCCESS:
            rc = lib.pam.pam_acct_mgmt(handle, 0)
        return rc == _PAM_SUCCESS
    finally:
        lib.pam.pam_end(handle, rc)
