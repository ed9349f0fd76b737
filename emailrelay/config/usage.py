"""Texts generated from the option table: --help, --version and the man page.

`help_text(verbose)`, `version_text(verbose)` and `man_page()` read
`option_table.OPTIONS`, so the help, the man page (written by `make man`) and
the parser cannot disagree; a test checks the committed man page.
"""

import sys
import textwrap

from .. import __version__
from .option_table import GROUPS, OPTIONS

# The program's exit statuses (the man page's EXIT STATUS section).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _wrap(text, width, indent):
    return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False, break_long_words=False)


def _default_note(opt):
    if opt.default is None or opt.kind in ("flag", "optional") or opt.multi:
        return None
    return str(opt.default)


def help_text(verbose):
    """The --help text: the basic options, or with `verbose` every option by group."""
    lines = ["usage: emailrelay [<option> [<option> ...]] [<config-file>]", ""]
    groups = GROUPS if verbose else GROUPS[:1]
    for group in groups:
        lines.append("%s options:" % group)
        for opt in OPTIONS:
            if opt.group != group:
                continue
            lines.append("  " + opt.synopsis())
            text = opt.help
            if not verbose:
                text = text.split(". ")[0].rstrip(".") + "."
            note = _default_note(opt)
            if verbose and note:
                text += " Default: %s." % note
            lines.append(_wrap(text, 79, "        "))
        lines.append("")
    if verbose:
        lines.append("A config file holds one option per line: the long name without "
                     "dashes, then")
        lines.append("the value after white space. '#' starts a comment line.")
    else:
        lines.append("For every option run \"emailrelay --help --verbose\".")
    return "\n".join(lines) + "\n"


COPYRIGHT = "Copyright (C) 2026 the emailrelay for Python developers"
WARRANTY = "This software is provided without warranty of any kind."


def version_text(verbose):
    """The --version text; with `verbose`, the build report E-MailRelay prints.

    The verbose layout is E-MailRelay 2.6's (banner, blank line, copyright,
    blank line, one `Feature: state` line each, blank line, licence), which
    wrappers grep; PAM, DNSBL and Python lines are ours.
    """
    text = "emailrelay %s\n" % __version__
    if not verbose:
        return text
    # Imported here, not at the top: --help and --version must not load them.
    import ctypes.util
    try:
        import ssl
        tls = ssl.OPENSSL_VERSION
    except ImportError:
        tls = "none"
    pam = "enabled" if ctypes.util.find_library("pam") else "disabled"
    features = [("Multi-threading", "enabled"), ("Unix domain sockets", "enabled"),
                ("POP server", "enabled"), ("Admin server", "enabled"), ("TLS library", tls),
                ("PAM", pam), ("DNSBL", "enabled"), ("Python", sys.version.split()[0])]
    lines = [text.rstrip("\n"), "", COPYRIGHT, ""]
    lines += ["%s: %s" % feature for feature in features]
    lines += ["", WARRANTY]
    return "\n".join(lines) + "\n"


def _roff(text):
    """Escapes text for roff: backslashes, leading dots and quotes, hyphens."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _example(lines):
    return [".nf", ".RS"] + [_roff(x) if x else "" for x in lines] + [".RE", ".fi"]


def _modes_section():
    """The man page's OPERATING MODES: inetd, socket activation, batched SMTP."""
    return ([
        ".SH OPERATING MODES",
        ".SS Run from inetd, xinetd or systemd with Accept=yes (\\-\\-inetd)",
        _roff("With --inetd the program serves one SMTP session on its standard input "
              "and output and exits. The client address is the peer of the socket on "
              "standard input; a pipe or a local socket has no address, so the session "
              "is refused unless --remote-clients is given, or --test-address [127.0.0.1] "
              "counts it as local. Logging goes to syslog or --log-file. An inetd.conf "
              "line:"),
    ] + _example([
        "smtp stream tcp nowait root /usr/local/sbin/emailrelay emailrelay --inetd "
        "--remote-clients --spool-dir /var/spool/emailrelay",
    ]) + [
        _roff("For systemd, etc/emailrelay.socket with Accept=yes starts an "
              "etc/emailrelay@.service instance (with StandardInput=socket) per "
              "connection. As installed they serve local clients only: the socket "
              "listens on 127.0.0.1:25 and the instances have no --remote-clients; the "
              "comments in both files show how to take mail from other hosts with "
              "--remote-clients and --server-auth."),
        ".SS systemd socket activation (Accept=no)",
        _roff("When systemd passes listening sockets (LISTEN_FDS and LISTEN_PID) the "
              "daemon serves them without --interface: each for the server its "
              "FileDescriptorName= names (smtp, pop or admin), SMTP otherwise. A socket "
              "unit emailrelay.socket that starts emailrelay.service:"),
    ] + _example([
        "[Socket]",
        "ListenStream=25",
        "Accept=no",
        "FileDescriptorName=smtp",
        "",
        "[Install]",
        "WantedBy=sockets.target",
    ]) + [
        ".SS Batched SMTP and policy tests (\\-\\-bsmtp, \\-\\-test\\-address)",
        _roff("With --bsmtp the program reads SMTP commands from its standard input "
              "without waiting for replies, writes the replies to its standard output, "
              "stores each accepted message in the spool, and exits with status 0 only "
              "when every command was accepted. A batch carried by another transport "
              "is stored with one command, and --test-address shows what the policy "
              "does for a client address, here that a remote client is refused "
              "without --remote-clients:"),
    ] + _example([
        "$ printf 'EHLO test\\r\\nQUIT\\r\\n' | emailrelay --bsmtp --test-address '[192.0.2.1]'",
        "554 5.7.1 no SMTP service for your address",
        "$ printf 'EHLO test\\r\\nMAIL FROM:<a@example.com>\\r\\nRCPT TO:<b@example.net>\\r\\n' \\",
        "    | emailrelay --bsmtp --remote-clients --test-address '[192.0.2.1]' \\",
        "    --address-verifier /usr/local/sbin/verify",
        "220 mail.example.com -- E-MailRelay V2.5.0 -- Service ready",
        "250-mail.example.com says hello",
        "...",
        "250 2.1.0 sender <a@example.com> OK",
        "550 5.1.1 relaying denied for 192.0.2.1",
        "$ echo $?",
        "1",
    ]))


def man_page():
    """The emailrelay(8) man page in roff, generated from the table."""
    out = [
        '.TH EMAILRELAY 8 "" "emailrelay %s" "System Manager\'s Manual"' % __version__,
        ".SH NAME",
        "emailrelay \\- store\\-and\\-forward SMTP relay, SMTP proxy and POP3 server",
        ".SH SYNOPSIS",
        ".B emailrelay",
        "[\\fIOPTIONS\\fR] [\\fIconfig\\-file\\fR]",
        ".br",
        ".B emailrelay \\-\\-as\\-server",
        ".br",
        ".B emailrelay \\-\\-as\\-client",
        "\\fIhost:port\\fR",
        ".br",
        ".B emailrelay \\-\\-as\\-proxy",
        "\\fIhost:port\\fR",
        ".SH DESCRIPTION",
        _roff("emailrelay stores the e-mail messages it receives over SMTP in a spool "
              "directory and forwards them to one fixed next-hop SMTP server, without "
              "routing. It runs as a storage daemon (--as-server), as a forwarding agent "
              "that sends the spool and exits (--as-client), or as a proxy that forwards "
              "each client's messages when it disconnects (--as-proxy). It can also serve "
              "the spool over POP3. It is a Python version of E-MailRelay with the same "
              "options, spool files and filter interface."),
        ".SH OPTIONS",
    ]
    for group in GROUPS:
        out.append(".SS %s options" % group)
        for opt in OPTIONS:
            if opt.group != group:
                continue
            out.append(".TP")
            out.append(".B " + _roff(opt.synopsis()))
            text = opt.help
            note = _default_note(opt)
            if note:
                text += " Default: %s." % note
            out.append(_roff(text))
    out += _modes_section()
    out += [
        ".SH CONFIG FILE",
        _roff("Options may also come from a config file, given as the one argument that "
              "is not an option. Each line holds one option: the long name without the "
              "dashes, white space, and the value; a flag is its name alone. Blank lines "
              "and lines starting with # are ignored. A file name may start with @app, "
              "which stands for the directory holding the program. For example:"),
        ".nf",
        ".RS",
        "spool\\-dir /var/spool/emailrelay",
        "port 587",
        "as\\-server",
        ".RE",
        ".fi",
        ".SH SIGNALS",
        _roff("SIGTERM and SIGINT stop the program cleanly: it stops listening, ends the "
              "sessions, leaves no spool file claimed or half written, and exits with "
              "status 0. The message being forwarded gets 5 seconds to finish; a next hop "
              "that has not answered by then is abandoned, and the message stays queued "
              "(logged as abandoned at shutdown). SIGHUP reopens the log file (for logrotate) and re-reads the "
              "secrets files; E-MailRelay does neither."),
        ".SH ENVIRONMENT",
        ".TP",
        ".B EMAILRELAY_DNSBL_CHECK_LOCAL",
        _roff("Set to 1, --dnsbl checks local (loopback, private, unique-local and "
              "link-local) client addresses too, which it otherwise lets through unchecked: "
              "for testing a block-list set-up from the relay's own host, connecting from "
              "127.0.0.2, say."),
        ".SH PRIVILEGES",
        _roff("Started as root, the program binds its ports and then runs with the effective "
              "user and group of --user (default daemon), keeping root as its real and saved "
              "user id. It takes root back for moments only: to create, rename and read spool "
              "files (only the user id, so new files are owned by root with the --user group, "
              "mode 0660), to write and remove the pid file (root, --user group), to re-read "
              "the secrets files and to reopen the log file on SIGHUP. Filters and verifiers "
              "run with the --user ids, real and effective, never as root."),
        ".SH SECRETS FILE",
        _roff("One entry per line: client|server, a mechanism, a name and a secret. Names and "
              "plain passwords are xtext: + followed by two hex digits stands for a byte, so "
              "a space is +20 and = is +3D. plain lines hold the password; md5 lines hold the "
              "output of emailrelay-passwd, so the file never holds the password itself (such "
              "lines serve CRAM-MD5 and APOP, not PLAIN or LOGIN). 'server none <address> "
              "<keyword>' trusts clients from an address, a wildcard such as 192.168.0.* or a "
              "network such as 10.0.0.0/8: they need not authenticate, and the keyword goes "
              "to the address verifier. The older words login (for plain), cram-md5 and apop "
              "(for md5) are accepted. A --server-auth file with neither accounts nor trusted "
              "addresses is refused at start-up. For example:"),
        ".nf",
        ".RS",
        "server plain alice my+20secret",
        "server md5 bob Or9RzqbiyG274KCY4bnnqKsH77SKdgvoDANvOZHvscaM",
        "server none 192.168.0.0/24 lan",
        "client plain relayuser smarthost+2Dpassword",
        ".RE",
        ".fi",
        ".SH FILTER EXIT CODES",
        _roff("A --filter runs with the content file and the envelope file as arguments (a "
              "program given with arguments of its own, such as \"/usr/bin/spamassassin -e\", "
              "gets the content file only, after them). Exit "
              "0 accepts the message; 1 to 99 reject it (a line of output like <<reason>> or "
              "[[reason]] gives the reason); 100 cancels it: the client is told it was "
              "accepted and the filter owns the files (it may have moved or removed them); 102 "
              "cancels it and asks for a rescan of the spool; 103 accepts it and rescans, so "
              "it is forwarded at once. A --client-filter runs before each message is "
              "forwarded: 0 sends it, 1 to 99 fail it to .bad, 100 skips it, 102 sends it and "
              "stops the pass, 103 sends it, 105 sends it and stops the pass (seed 000: \"stop "
              "scanning for more spooled messages after processing the current one\")."),
        ".SH VERIFIER EXIT CODES",
        _roff("An --address-verifier program gets the recipient, the local domain, the sender "
              "(empty for VRFY), the client's IP address, the authentication mechanism (none "
              "when trusted) and name. Exit 0: a local mailbox (output: full name, then the "
              "mailbox); 1: a valid remote address (output: a line ignored, then the address "
              "to forward to, which may differ from the one given); 3: a temporary failure "
              "(450, the output is the reason); 100: the connection is dropped; any other "
              "exit: an invalid address (550, the output is the reason). A net: verifier "
              "answers the same in one line: 0|mailbox|full name, 1|address, 2|reason, "
              "3|reason or 100."),
        ".SH SPOOL FILES",
        _roff("Each message is a .content file and an envelope whose suffix is its state: "
              ".envelope.new while it is received and filtered, .envelope once committed and "
              "waiting, .envelope.busy while a forwarder sends it, .envelope.bad after a "
              "failure (the reason is appended as X-MailRelay-Reason), .envelope.local for "
              "local recipients. A .bad message stays until emailrelay-resubmit (say from "
              "cron) renames it back to .envelope, up to --retries times; the admin command "
              "unfail-all does the same at once. Delete both files to discard a message. Lines "
              "after X-MailRelay-End, which E-MailRelay's own reader ignores, hold this "
              "version's retry state (X-MailRelay-Retry) and the RFC 3461 DSN parameters "
              "(X-MailRelay-Dsn-Ret, -Envid and -Rcpt). At start-up, and when a --workers "
              "worker dies, what a killed process left is repaired: its .envelope.busy files "
              "go back to .envelope, its .envelope.new files (never acknowledged) are removed "
              "with their content, and content files that no envelope refers to (in the spool "
              "or a --pop-by-name sub-directory) are removed once their writer is gone."),
        ".SH ADMIN COMMANDS",
        _roff("With --admin <port>, a telnet-style interface on that port (local clients "
              "only) takes: help; flush (forward now and report the counts the log line "
              "gives: N message(s) sent, N failed, N to be retried); forward (forward now, no "
              "wait); list (one line per spooled message: id, state (new, ready, deferred, "
              "busy, bad, local), size=, from=, to=, and attempts=, next= and reason= once it "
              "has failed, as emailrelay-sendmail -bp and mailq print it); failures (the .bad "
              "messages and their reasons); unfail-all (queue the .bad messages again); status "
              "(counters: messages-stored, -rejected, -forwarded, -failed, -deferred); "
              "notify (report events as they happen); pid; quit; terminate (with "
              "--admin-terminate)."),
        ".SH EXAMPLES",
        _roff("A storage daemon that forwards from cron every five minutes, with a crontab "
              "line:"),
        ".nf",
        ".RS",
        "emailrelay \\-\\-as\\-server \\-\\-spool\\-dir /var/spool/emailrelay",
        "*/5 * * * * /usr/local/sbin/emailrelay \\-\\-as\\-client smtp.example.net:25",
        ".RE",
        ".fi",
        ".PP",
        _roff("An ip-up hook (etc/ip-up.emailrelay, installed as /etc/ppp/ip-up.d/emailrelay) "
              "forwards when the link comes up; set SMARTHOST in /etc/default/emailrelay. It "
              "adds --syslog to --as-client (which implies --no-syslog), so a forward that "
              "fails is in the mail log."),
        ".PP",
        _roff("logrotate: etc/logrotate.emailrelay (installed as /etc/logrotate.d/emailrelay) "
              "rotates /var/log/emailrelay/*.log and sends SIGHUP; the new file gets the old "
              "one's owner and mode."),
        ".PP",
        _roff("systemd: make install writes emailrelay.service with the installed paths and "
              "hardening (ProtectSystem=strict, NoNewPrivileges, a capability bounding set of "
              "CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID); systemctl enable --now emailrelay, "
              "systemctl reload emailrelay for SIGHUP."),
        ".PP",
        _roff("A smarthost with TLS and AUTH (the client line of the secrets file holds the "
              "account):"),
        ".nf",
        ".RS",
        "emailrelay \\-\\-as\\-proxy smtp.example.net:587 \\-\\-client\\-tls \\-\\-client\\-auth /etc/emailrelay.auth",
        ".RE",
        ".fi",
        ".PP",
        _roff("POP by name: each user reads a sub-directory of the spool filled by "
              "emailrelay-filter-copy:"),
        ".nf",
        ".RS",
        "emailrelay \\-\\-as\\-server \\-\\-pop \\-\\-pop\\-by\\-name \\-\\-pop\\-auth /etc/emailrelay.pop "
        "\\-\\-filter emailrelay\\-filter\\-copy",
        ".RE",
        ".fi",
        ".SH EXIT STATUS",
        ".TP",
        ".B 0",
        _roff("Success; with --as-client, every message was forwarded."),
        ".TP",
        ".B 1",
        _roff("An error at start-up or run time, such as an unreadable secrets file, a "
              "port in use, or with --as-client a message that failed or a next-hop "
              "server that cannot be reached."),
        ".TP",
        ".B 2",
        _roff("A usage error: an unknown option, a missing or malformed value, or "
              "options that contradict each other. Nothing has been started."),
        ".SH FILES",
        ".TP",
        ".B /var/spool/emailrelay",
        _roff("The default spool directory."),
        ".TP",
        ".B /usr/local/etc/emailrelay.conf",
        _roff("The config file that make install writes with the default PREFIX=/usr/local "
              "(/etc/emailrelay.conf with PREFIX=/usr, or SYSCONFDIR); emailrelay.service "
              "passes it to the program. emailrelay.conf.example next to it shows more "
              "options."),
        ".TP",
        ".B /etc/ppp/ip\\-up.d/emailrelay",
        _roff("The ip-up hook: forwards the spool when a link comes up, logging to syslog."),
        ".TP",
        ".B /etc/default/emailrelay",
        _roff("Settings for the ip-up hook: SMARTHOST (the next hop), EMAILRELAY_SPOOL and "
              "EMAILRELAY_OPTS."),
        ".TP",
        ".B /etc/logrotate.d/emailrelay",
        _roff("Rotates /var/log/emailrelay/*.log."),
        ".TP",
        ".B /var/log/emailrelay",
        _roff("The directory for --log-file, created by make install and by the systemd "
              "unit (LogsDirectory=)."),
        ".SH SEE ALSO",
        ".BR emailrelay\\-submit (8),",
        ".BR emailrelay\\-passwd (8),",
        ".BR emailrelay\\-resubmit (8),",
        ".BR emailrelay\\-filter\\-copy (8),",
        ".BR emailrelay\\-sendmail (8),",
        ".BR syslog (3)",
    ]
    return "\n".join(out) + "\n"
