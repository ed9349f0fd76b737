"""Password checks through Linux PAM (libpam.so.0), using ctypes.

`authenticate(user, password)` runs the PAM service's `auth` and `account`
stacks with a conversation function that answers every prompt with the
user name (echo on) or the password (echo off). `available()` says whether
libpam can be loaded; nothing here raises because libpam is missing except
`authenticate`, which raises PamUnavailable with a clear message.

PAM modules are not all thread-safe, so the PAM calls are serialised; but
the delay a module asks for after a failure (pam_unix: about two seconds)
is taken over through PAM_FAIL_DELAY and slept after the lock is released,
so one failing login delays only its own session, never every other one.
"""

import threading
import time

SERVICE = "emailrelay"

_PAM_SUCCESS = 0
_PAM_BUF_ERR = 5
_PAM_CONV_ERR = 19
_PAM_PROMPT_ECHO_OFF = 1
_PAM_PROMPT_ECHO_ON = 2
_PAM_ERROR_MSG = 3
_PAM_TEXT_INFO = 4
_PAM_FAIL_DELAY = 10

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
    # Imported on first use: only a site that authenticates with PAM loads them.
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
    libc.free.restype = None
    libc.free.argtypes = [ctypes.c_void_p]
    delay_func = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)
    libpam.pam_set_item.restype = ctypes.c_int
    libpam.pam_set_item.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
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
    lib.delay_func = delay_func
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
    delay = []
    with _lock:
        lib = _load()
        if lib is None:
            raise PamUnavailable("PAM is not available: %s" % _load_error)
        ok = _authenticate(lib, user.encode("utf-8", "surrogateescape"),
                           password.encode("utf-8", "surrogateescape"),
                           (service or SERVICE).encode("utf-8"), delay)
    if delay and not ok:
        time.sleep(delay[0] / 1e6)
    return ok


def conversation(lib, user, password):
    """The PAM conversation function answering prompts with `user` / `password`.

    Answers are allocated with libc (PAM frees them with free()); on an
    error nothing allocated here is left behind.
    """
    ctypes = lib.ctypes

    def converse(count, messages, responses, _appdata):
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
                for j in range(i):
                    if answers[j].resp:
                        lib.libc.free(answers[j].resp)
                lib.libc.free(block)
                return _PAM_CONV_ERR
        responses[0] = answers
        return _PAM_SUCCESS

    return converse


def _authenticate(lib, user, password, service, delay):
    """One PAM transaction; a failure delay PAM asks for is appended to `delay` (µs)."""
    ctypes = lib.ctypes
    callback = lib.conv_func(conversation(lib, user, password))
    conv = lib.PamConv(callback, None)

    def record_delay(_status, usec, _appdata):
        delay.append(usec)

    delay_callback = lib.delay_func(record_delay)
    handle = ctypes.c_void_p()
    rc = lib.pam.pam_start(service, user, ctypes.byref(conv), ctypes.byref(handle))
    if rc != _PAM_SUCCESS:
        return False
    try:
        lib.pam.pam_set_item(handle, _PAM_FAIL_DELAY,
                             ctypes.cast(delay_callback, ctypes.c_void_p))
        rc = lib.pam.pam_authenticate(handle, 0)
        if rc == _PAM_SUCCESS:
            rc = lib.pam.pam_acct_mgmt(handle, 0)
        return rc == _PAM_SUCCESS
    finally:
        lib.pam.pam_end(handle, rc)
