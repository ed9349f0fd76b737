"""The option table: one row per option, read by the parser and by the help texts.

`OPTIONS` is the one table of options: parsing (`options`), config files,
and (through `usage`) `--help`, `--help --verbose` and the man page
(written to man/emailrelay.8 by `make man`) all read it. `BY_NAME` and
`BY_SHORT` index it; `IMPLIED` lists what the mode options stand for.

Option names, short letters and groups are E-MailRelay's (man page v2.x), so
scripts written for E-MailRelay work unchanged. The server-limit options
(`--max-...`, `--min-free-space`) and `--listen-backlog` are additions of
this version.
"""

GROUPS = ("Basic", "SMTP client", "SMTP server", "POP server", "Admin server",
          "Authentication", "TLS", "Process", "Logging")

ANONYMOUS_SCOPES = ("vrfy", "server", "content", "client")
SYSLOG_FACILITIES = ("auth", "authpriv", "cron", "daemon", "ftp", "lpr", "mail", "news",
                     "user", "uucp", "local0", "local1", "local2", "local3", "local4",
                     "local5", "local6", "local7")
TLS_VERSIONS = ("tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3")
AUTH_CONFIG_KEYS = ("m", "x", "a", "d")
PAM_PATH = "/pam"
DEFAULT_CA = "<default>"

# Value kinds: how the text after an option becomes a value.
#   flag      no value; True when given
#   optional  a flag that may take a value with '=' (True or the text)
#   str       text as given
#   path      a file name: '@app' expanded, made absolute (a daemon runs in /)
#   program   a filter or verifier spec: '@app' expanded, otherwise as given
#   int       a whole number >= `minimum`
#   time      seconds, a whole or decimal number >= 0
#   port      a port number 1..65535
KINDS = ("flag", "optional", "str", "path", "program", "int", "time", "port")


class Option:
    """One row of the option table.

    `name` is the long name without dashes; `short` the letter or None;
    `value` the value name shown in help (`<port>`), None for a flag, or
    `[<scope>]` for an optional value; `group` one of GROUPS; `help` one
    paragraph; `multi` whether it may repeat (the value is then a list);
    `kind` one of KINDS; `default` the value when not given; `minimum` for
    `int`.
    """

    __slots__ = ("name", "short", "value", "group", "help", "multi", "kind", "default",
                 "minimum")

    def __init__(self, name, short, value, group, help, kind=None, multi=False, default=None,
                 minimum=0):
        self.name = name
        self.short = short
        self.value = value
        self.group = group
        self.help = help
        self.kind = kind or ("flag" if value is None else "str")
        self.multi = multi
        self.default = default
        self.minimum = minimum

    @property
    def attr(self):
        """The Config attribute name: dashes become underscores."""
        return self.name.replace("-", "_")

    def synopsis(self, sep=", "):
        """`-p, --port <port>` as help and the man page show it."""
        if self.kind == "optional":
            long_form = "--%s, --%s=%s" % (self.name, self.name, self.value.strip("[]"))
        elif self.value:
            long_form = "--%s %s" % (self.name, self.value)
        else:
            long_form = "--" + self.name
        return ("-%s%s" % (self.short, sep) if self.short else "") + long_form


_O = Option
OPTIONS = [
    # Basic
    _O("as-client", "q", "<host:port>", "Basic",
       "Forwards the spooled messages to the given server and then exits. The same as "
       "--log, --no-syslog, --no-daemon, --dont-serve, --forward and --forward-to. "
       "The exit status is 0 only when every message was forwarded."),
    _O("as-proxy", "y", "<host:port>", "Basic",
       "Runs as a store-and-forward proxy daemon. The same as --log, --close-stderr, "
       "--forward-on-disconnect and --forward-to. Use those options instead to keep the "
       "standard error stream open."),
    _O("as-server", "d", None, "Basic",
       "Runs as a background storage daemon that accepts messages and spools them. The "
       "same as --log and --close-stderr. Use --log instead to keep the standard error "
       "stream open."),
    _O("spool-dir", "s", "<dir>", "Basic",
       "Sets the directory that holds messages that have been received but not yet "
       "forwarded.", kind="path", default="/var/spool/emailrelay"),
    _O("help", "h", None, "Basic",
       "Shows help and exits. With --verbose every option is shown."),
    _O("version", "V", None, "Basic",
       "Shows the version and exits. With --verbose also shows what this build can do."),
    # SMTP client
    _O("forward", "f", None, "SMTP client",
       "Forwards the spooled messages when the program starts."),
    _O("forward-on-disconnect", "1", None, "SMTP client",
       "Forwards the spooled messages whenever an SMTP client disconnects."),
    _O("forward-to", "o", "<host:port>", "SMTP client",
       "Sets the address of the next-hop SMTP server that messages are forwarded to. "
       "Use host:port@socks-host:socks-port to connect through a SOCKS 4a proxy."),
    _O("poll", "O", "<period>", "SMTP client",
       "Forwards the spooled messages every <period> seconds.", kind="time"),
    _O("client-filter", "Y", "<program>", "SMTP client",
       "Runs the given filter program on each message just before it is forwarded. "
       "exit:<number> emulates a program that exits with that number; net:, spam: and "
       "spam-edit: work as for --filter (net:127.0.0.1:10025). May be given more than "
       "once: the filters run in turn.", kind="program", multi=True),
    _O("client-interface", "6", "<ip-address>", "SMTP client",
       "Binds the local end of outgoing SMTP connections to this address. 0.0.0.0 means "
       "IPv4 only, :: means IPv6 only."),
    _O("connection-timeout", "U", "<time>", "SMTP client",
       "Sets the timeout in seconds for connecting to the next-hop server.",
       kind="time", default=40),
    _O("idle-timeout", None, "<time>", "SMTP client",
       "Sets the timeout in seconds for network input from SMTP, POP and admin clients. "
       "POP sessions wait 600 seconds, the minimum RFC 1939 asks for, and admin "
       "sessions 600 seconds too, unless this option is given; 0 means no timeout.",
       kind="time", default=60),
    _O("response-timeout", "T", "<time>", "SMTP client",
       "Sets the timeout in seconds for each response from the next-hop server.",
       kind="time", default=60),
    _O("client-smtp-config", "c", "<config>", "SMTP client",
       "Configures the SMTP client protocol: a comma-separated list of keywords, each "
       "turned on by itself or with a + prefix and off with a no or - prefix: "
       "pipelining (on here; off in E-MailRelay 2.6), smtputf8strict (on: a message with "
       "UTF-8 addresses fails when the next hop lacks SMTPUTF8), eightbitstrict (off: "
       "8-bit content is sent even when the next hop lacks 8BITMIME), binarymimestrict "
       "(on: binary content fails when the next hop lacks BINARYMIME and CHUNKING).",
       multi=True),
    _O("forward-to-some", None, None, "SMTP client",
       "Forwards a message even when the next-hop server rejects some of its recipients."),
    _O("retry-interval", None, "<time>", "SMTP client",
       "Sets the delay in seconds before a message that failed temporarily (a 4xx reply, "
       "or a next-hop server that cannot be reached) is tried again by the forwarding "
       "daemon; each further failure doubles it, up to --retry-max-interval. The retry "
       "count and time are kept in the envelope file, so a restart keeps them. 0 turns "
       "retrying off, as E-MailRelay: a 4xx reply then fails the message at once.",
       kind="time", default=60),
    _O("retry-max-interval", None, "<time>", "SMTP client",
       "Sets the longest delay in seconds between two attempts to forward a message that "
       "fails temporarily. It also caps a delay stored in the spool by an earlier run.",
       kind="time", default=3600),
    _O("retry-lifetime", None, "<time>", "SMTP client",
       "Sets how long in seconds a message may go on failing temporarily before it is "
       "failed (renamed .bad with the last reason). The default is five days.",
       kind="time", default=432000),
    _O("immediate", "m", None, "SMTP client",
       "Forwards each message as it is received, before the submitting client gets its "
       "reply. Each session forwards on a connection of its own, alongside the others; "
       "clients may still time out while a slow next hop answers."),
    # SMTP server
    _O("port", "p", "<port>", "SMTP server",
       "Sets the port that the SMTP server listens on.", kind="port", default=25),
    _O("remote-clients", "r", None, "SMTP server",
       "Accepts connections from addresses that are not local. Without it only loopback, "
       "private (RFC 1918, RFC 4193) and link-local addresses may connect, so that a "
       "relay is not exposed to the internet by accident."),
    _O("address-verifier", None, "<program>", "SMTP server",
       "Runs the given program to verify each recipient address. net:<transport-address> "
       "asks a verifier daemon instead over TCP or a unix socket, for example "
       "net:127.0.0.1:10026 or net:/run/verifier.sock.", kind="program"),
    _O("anonymous", "A", "[<scope>]", "SMTP server",
       "Says less about this server: no VRFY, a terse greeting and replies, no Received "
       "line, no AUTH= on forwarded MAIL commands. A comma-separated list of scopes "
       "limits it: vrfy, server, content, client.", kind="optional"),
    _O("dnsbl", None, "<config>", "SMTP server",
       "Rejects connections from addresses listed by DNS block lists: a comma-separated "
       "list of block-list domains, then optionally a threshold (how many lists must list "
       "the address, default 1; 0 only logs), a timeout (milliseconds, or seconds with an "
       "s suffix, default 5000; negative means refuse when the lists do not answer in "
       "time) and the DNS server (default the first nameserver in /etc/resolv.conf), for "
       "example zen.spamhaus.org,bl.spamcop.net,1,2s. E-MailRelay's older form "
       "dns-server,timeout,threshold,list[,list...] also works, for example "
       "127.0.0.1:53,1000,1,zen.spamhaus.org. Local addresses (loopback, private, "
       "unique-local, link-local) are not checked unless the environment variable "
       "EMAILRELAY_DNSBL_CHECK_LOCAL is 1. A refused client gets 554 instead of the "
       "greeting, or 550 at each RCPT with --server-smtp-config rcpt-dns-rbl."),
    _O("domain", "D", "<fqdn>", "SMTP server",
       "Sets the name used in EHLO, the greeting, Received lines and authentication "
       "challenges. The default is this host's fully qualified name, else its host name, "
       "else the address literal of the outgoing interface (a warning is logged when the "
       "host is only called localhost). When that name has no dot, EHLO to the next hop "
       "uses the address literal of the connection instead (such as [127.0.0.1]); a "
       "given --domain is used as it is."),
    _O("filter", "z", "<program>", "SMTP server",
       "Runs the given filter program on each message as it is stored. Exit codes 1 to 99 "
       "reject the message. exit:<number> emulates a program that exits with that "
       "number. net:<transport-address> asks a filter daemon over TCP or a unix socket "
       "(net:127.0.0.1:10025, net:/run/filter.sock); spam:<transport-address> asks "
       "SpamAssassin's spamd and rejects spam (spam:127.0.0.1:783); "
       "spam-edit:<transport-address> lets spamd mark up the message instead. May be given "
       "more than once: the filters run in turn.",
       kind="program", multi=True),
    _O("filter-timeout", "W", "<time>", "SMTP server",
       "Sets the timeout in seconds for a filter or verifier program, and for connecting "
       "to and hearing from a net:, spam: or spam-edit: daemon.",
       kind="time", default=60),
    _O("interface", "I", "<ip-address-list>", "SMTP server",
       "Sets the addresses the SMTP, POP and admin servers listen on: a comma-separated "
       "list, and the option may be repeated. Prefix an address with smtp=, pop= or "
       "admin= to use it for one kind of server only; fd#N uses an inherited listening "
       "socket. An interface name (eth0, ppp0) stands for every address the interface has "
       "at start-up, and a -ipv4 or -ipv6 suffix picks one family (ppp0-ipv4, "
       "smtp=eth0-ipv6); an unknown interface or one without such an address stops "
       "start-up. The default is every IPv4 and IPv6 address. Sockets passed by systemd "
       "socket activation (LISTEN_FDS, Accept=no) are used without this option: "
       "each for the server its FileDescriptorName= names (smtp, pop or admin), SMTP "
       "otherwise.", multi=True),
    _O("proxy-protocol", None, "<address-list>", "SMTP server",
       "Serves clients through load balancers such as HAProxy (send-proxy or "
       "send-proxy-v2): every connection to the SMTP and POP servers must come from one "
       "of these addresses and start with a PROXY protocol header, version 1 or 2, "
       "which names the real client. That client's address is then the one the "
       "open-relay guard (--remote-clients), --max-connections-per-address, --dnsbl, "
       "trusted addresses, the authentication-failure budget, the Received line and the "
       "envelope see. A comma-separated list of addresses, 192.168.0.* wildcards or "
       "CIDR networks; prefix an item with smtp= or pop= for one server only, and the "
       "option may be repeated. A connection from another address, or with a header "
       "that is malformed or does not arrive within --proxy-protocol-timeout, is logged "
       "and closed.", multi=True),
    _O("proxy-protocol-timeout", None, "<time>", "SMTP server",
       "Sets how long in seconds a connection from a --proxy-protocol load balancer "
       "may take to send its PROXY header.", kind="time", default=5),
    _O("prompt-timeout", "w", "<time>", "SMTP server",
       "Sets the timeout in seconds for the next-hop server's greeting; after it the "
       "dialogue goes ahead without one.", kind="time", default=20),
    _O("size", "M", "<bytes>", "SMTP server",
       "Limits the size of messages submitted over SMTP. 0 means no limit.",
       kind="int", default=0),
    _O("max-connections", None, "<n>", "SMTP server",
       "Limits the number of connections served at once; above it an SMTP client gets "
       "450 Too many simultaneous connections (ZMailer's MaxParallelConnections reply) "
       "and is disconnected. The SMTP, POP and admin servers each have a budget of this size "
       "of their own, so a flood on one cannot lock out another. At start-up the soft "
       "open-files limit is raised to the hard limit when the budgets may need more "
       "(about 3 descriptors a session); a warning says when the hard limit is too small.",
       kind="int", default=200, minimum=1),
    _O("max-connections-per-address", None, "<n>", "SMTP server",
       "Limits the number of connections from one client address (to each of the SMTP, "
       "POP and admin servers). Over it an SMTP client gets 450 4.7.0 and is "
       "disconnected; at four times the limit the connection is closed without a reply, "
       "which is cheap under a flood (ZMailer PARAM MaxSameIpSource).",
       kind="int", default=20, minimum=1),
    _O("listen-backlog", None, "<n>", "SMTP server",
       "Sets the listen() backlog of the listening sockets: how many connections the "
       "kernel queues before they are accepted. 0, the default, means the system "
       "maximum (/proc/sys/net/core/somaxconn on Linux), so a burst of clients is "
       "queued rather than dropped.", kind="int", default=0),
    _O("workers", None, "<n>", "SMTP server",
       "Runs the SMTP and POP servers in this many worker processes, which share the "
       "listening sockets, so that a host with several cores uses them. The main process "
       "keeps the forwarder and the admin server and restarts a worker that dies. The "
       "connection limits apply to each worker on its own. More than 1 cannot be used "
       "with --immediate.", kind="int", default=1, minimum=1),
    _O("max-recipients", None, "<n>", "SMTP server",
       "Limits the number of recipients of one message (at least 100, as RFC 5321 asks).",
       kind="int", default=1000, minimum=100),
    _O("max-bounce-recipients", None, "<n>", "SMTP server",
       "Limits the number of recipients of a message with an empty sender (MAIL FROM:<>).",
       kind="int", default=3, minimum=1),
    _O("max-bad-commands", None, "<n>", "SMTP server",
       "Sets how many unknown or malformed commands a client may send: the next one "
       "gets 421 (SMTP) or -ERR (POP) and the connection is closed. Without it an SMTP "
       "client is disconnected without a reply at its 8th error, as E-MailRelay does, "
       "and a POP client may send 10.",
       kind="int", minimum=1),
    _O("min-data-rate", None, "<octets>", "SMTP server",
       "Sets the least average rate, in octets per second, at which a client must send "
       "the text of a message (DATA, or BDAT chunks up to LAST): the text may take the "
       "--idle-timeout plus one second for every <octets> received, and a client that "
       "falls behind gets 421 and is disconnected, however often it sends a little "
       "(Postfix smtpd_min_data_rate). 0 leaves only the --idle-timeout.",
       kind="int", default=500),
    _O("min-free-space", None, "<kbytes>", "SMTP server",
       "Refuses new messages (452 4.3.1) while the spool file system has less free space "
       "than this, checked at MAIL and again before each message is committed. 0 turns "
       "the check off.", kind="int", default=1024),
    _O("inetd", None, None, "SMTP server",
       "Serves one SMTP session on the standard input and output and then exits, as "
       "inetd, xinetd or a systemd socket unit with Accept=yes run it (ZMailer -n). The "
       "client address is the peer of the socket on standard input; on a pipe it is "
       "unknown, which is not a local address: such a session is refused unless "
       "--remote-clients is given, and --test-address [127.0.0.1] counts it as local. "
       "Logging goes to syslog or --log-file, never to the client."),
    _O("bsmtp", None, None, "SMTP server",
       "Reads a batch of SMTP commands (batched SMTP) from the standard input, writes "
       "the replies to the standard output, stores each accepted message in the spool "
       "as a network session would, and exits (ZMailer -i). The exit status is 0 only "
       "when every command was accepted and the batch did not end inside a "
       "transaction. The client address is 127.0.0.1 unless --test-address says "
       "otherwise."),
    _O("test-address", None, "<[address]>", "SMTP server",
       "With --bsmtp or --inetd, makes the session behave as if the client had this "
       "address, written as an address literal such as [192.0.2.1] or "
       "[IPv6:2001:db8::1], for every policy that looks at the client address: "
       "--remote-clients, trusted lines of the --server-auth file, the client address "
       "given to verifiers, block lists; it is also the address in the Received line "
       "and the envelope (ZMailer -T)."),
    _O("max-load", None, "<load>", "SMTP server",
       "Refuses new SMTP connections with 421 4.3.2 while the one-minute load average "
       "is above this number (ZMailer -L)."),
    _O("tarpit", None, "<initial>,<exponent>,<limit>", "SMTP server",
       "Delays each 4xx and 5xx reply of a session: the first by <initial> seconds, each "
       "next one by the previous delay plus the previous delay times <exponent>, never "
       "more than <limit> seconds (ZMailer PARAM tarpit). Other sessions are not "
       "slowed down."),
    _O("helo-check", None, None, "SMTP server",
       "Requires the EHLO or HELO argument to be a syntactically valid domain name or "
       "address literal; anything else gets 501 (ZMailer -h)."),
    _O("greeting", None, "<text>", "SMTP server",
       "Sets the text of the 220 greeting after the code: %H is the --domain name, %V "
       "the version, %T the local time and %% a percent sign; ZMailer's %I (ident) and "
       "%X (translation table) expand to nothing. Start it with %H, as RFC "
       "5321 asks. May be given more than once for a multi-line greeting (ZMailer "
       "PARAM hdr220).", multi=True),
    _O("help-text", None, "<file>", "SMTP server",
       "Adds the lines of this file to the reply to a HELP command without an argument, "
       "as a 214 multi-line reply (ZMailer PARAM help).", kind="path"),
    _O("server-smtp-config", "Z", "<config>", "SMTP server",
       "Configures the SMTP server protocol: a comma-separated list of keywords, each "
       "turned on by itself or with a + prefix and off with a no or - prefix: pipelining "
       "(on), chunking (off: BDAT and BINARYMIME), smtputf8 (off: advertise SMTPUTF8), "
       "smtputf8strict (off: refuse UTF-8 addresses without MAIL FROM SMTPUTF8), "
       "strictparsing (on: angle brackets required in MAIL FROM and RCPT TO), alabels "
       "(on: UTF-8 domain names stored as A-labels, xn--...), enhancedstatuscodes (off: "
       "advertise ENHANCEDSTATUSCODES and put RFC 3463 codes in replies; an addition of "
       "this version), and ZMailer's switches (seed 004): dsn (on: advertise DSN and keep "
       "RFC 3461 RET, ENVID, NOTIFY and ORCPT for the next hop), 8bitmime (on: advertise "
       "8BITMIME; 8-bit text is taken either way), etrn (on: ETRN when forwarding is "
       "configured), ehlo (on: off answers EHLO with 500, so clients use HELO), "
       "force-rcpt-notify-never (off: record NOTIFY=NEVER for every recipient), "
       "rcpt-dns-rbl (off: a client that --dnsbl refuses is greeted and gets 550 at every "
       "RCPT instead of 554 before the greeting) and "
       "auth-login-also-without-tls (off: offer --server-auth-program's AUTH PLAIN and "
       "LOGIN, or PAM's PLAIN, without TLS).", multi=True),
    # POP server
    _O("pop", "B", None, "POP server",
       "Runs a POP3 server giving access to the spooled messages, on port 110 unless "
       "--pop-port says otherwise. STLS is offered with --server-tls."),
    _O("pop-by-name", "J", None, "POP server",
       "Serves each POP user the sub-directory of the spool directory named after the "
       "user, such as emailrelay-filter-copy fills."),
    _O("pop-no-delete", "G", None, "POP server",
       "Makes the POP DELE command succeed without deleting anything."),
    _O("pop-port", "E", "<port>", "POP server",
       "Sets the port that the POP server listens on.", kind="port", default=110),
    # Admin server
    _O("admin", "a", "<port>", "Admin server",
       "Runs the administration interface on this port (use telnet or nc); it can flush "
       "the spool to the --forward-to server and show its state.", kind="port"),
    _O("admin-terminate", "Q", None, "Admin server",
       "Enables the terminate command of the administration interface."),
    # Authentication
    _O("client-auth", "C", "<file>", "Authentication",
       "Authenticates to the next-hop server with the client line of this secrets file "
       "(client plain|md5 <user> <password>).", kind="path"),
    _O("client-auth-config", None, "<config>", "Authentication",
       "Chooses client authentication mechanisms: semicolon-separated items, each a key "
       "and a colon and a comma-separated list of mechanisms: m (preferred), x (avoided), "
       "a and d (the same once TLS is active).", ),
    _O("server-auth", "S", "<file>", "Authentication",
       "Requires SMTP clients to authenticate with an account from the server lines of "
       "this secrets file (server plain|md5 <user> <password>). /pam uses PAM.",
       kind="path"),
    _O("server-auth-config", None, "<config>", "Authentication",
       "Chooses the SMTP server's authentication mechanisms: semicolon-separated items, "
       "each a key and a colon and a comma-separated list of mechanisms: m (allowed), x "
       "(denied), a and d (the same once TLS is active); for example m:;a:plain."),
    _O("server-auth-program", None, "<program>", "Authentication",
       "Requires SMTP clients to authenticate with AUTH PLAIN or LOGIN, offered only "
       "once TLS is active, and checks each user name and password by running this "
       "program with the user name as its one argument and the password and a newline "
       "on its standard input; exit status 0 accepts (ZMailer PARAM SMTP-auth-pipe). "
       "No shell, an almost empty environment, and the --filter-timeout limit; the "
       "password is never in an argument, the environment or the log. Cannot be used "
       "with --server-auth.", kind="path"),
    _O("pop-auth", "F", "<file>", "Authentication",
       "Sets the secrets file with the POP accounts (server lines, as for --server-auth). "
       "/pam uses PAM. Default with --pop: /etc/emailrelay.auth (E-MailRelay before 2.6; "
       "2.6 requires this option).", kind="path"),
    # TLS
    _O("client-tls", "j", None, "TLS",
       "Uses STARTTLS on outgoing SMTP connections when the server offers it."),
    _O("client-tls-certificate", None, "<pem-file>", "TLS",
       "Sets the client's private key and certificate chain (one PEM file, or the option "
       "twice: key file first, then certificate file).", kind="path", multi=True),
    _O("client-tls-connection", "b", None, "TLS",
       "Uses implicit TLS (SMTPS) for outgoing SMTP connections."),
    _O("client-tls-required", None, None, "TLS",
       "Refuses to send a message over an outgoing connection without TLS."),
    _O("client-tls-server-name", None, "<hostname>", "TLS",
       "Sets the server name sent in the TLS handshake (SNI)."),
    _O("client-tls-verify", None, "<ca-list>", "TLS",
       "Verifies the next-hop server's certificate against the CA certificates in this "
       "file or directory; <default> uses the system's CAs.", kind="path"),
    _O("client-tls-verify-name", None, "<cname>", "TLS",
       "Requires this name in the next-hop server's certificate."),
    _O("server-tls", "K", None, "TLS",
       "Offers STARTTLS to SMTP clients and STLS to POP clients. Needs "
       "--server-tls-certificate."),
    _O("server-tls-certificate", None, "<pem-file>", "TLS",
       "Sets the server's private key and certificate chain (one PEM file, or the option "
       "twice: key file first, then certificate file).", kind="path", multi=True),
    _O("server-tls-connection", None, None, "TLS",
       "Uses implicit TLS (SMTPS) on the SMTP port, or with --inetd on the standard "
       "input (ZMailer -t). Needs --server-tls-certificate."),
    _O("server-tls-required", None, None, "TLS",
       "Requires SMTP and POP clients to use TLS before they authenticate or send mail."),
    _O("server-tls-verify", None, "<ca-list>", "TLS",
       "Requires client certificates signed by the CAs in this file or directory; "
       "<default> uses the system's CAs.", kind="path"),
    _O("tls-config", "9", "<options>", "TLS",
       "Configures TLS with a comma-separated list of keywords: tlsv1.0 to tlsv1.3 set "
       "the lowest protocol version, -tlsv1.0 to -tlsv1.3 the highest; openssl names the "
       "only library there is."),
    # Process
    _O("dont-serve", "x", None, "Process",
       "Runs no servers (SMTP, POP, admin); the program exits when any forwarding at "
       "start-up is done."),
    _O("hidden", "H", None, "Process",
       "Windows only: accepted and ignored."),
    _O("localedir", None, "<dir>", "Process",
       "Accepted for compatibility; this version has no message catalogues and always "
       "speaks English.", kind="path"),
    _O("no-daemon", "t", None, "Process",
       "Runs in the foreground instead of becoming a background daemon."),
    _O("no-smtp", "X", None, "Process",
       "Runs no SMTP server."),
    _O("pid-file", "i", "<path>", "Process",
       "Writes the process id to this file once running (after becoming a daemon); the "
       "parent directory is created if need be and the file is removed at exit.",
       kind="path"),
    _O("user", "u", "<username>", "Process",
       "When started as root, switches to this user once the listening ports are open "
       "and the secrets files read. root means no switch.", default="daemon"),
    # Logging
    _O("verbose", "v", None, "Logging",
       "Logs more with --log, and shows more help with --help."),
    _O("log", "l", None, "Logging",
       "Logs to the standard error stream and to syslog (see --close-stderr, --log-file "
       "and --no-syslog). Without it only warnings and errors are logged."),
    _O("debug", "g", None, "Logging",
       "Logs debug lines too. They may show passwords and message content."),
    _O("log-address", None, None, "Logging",
       "Adds the client's address to session log lines."),
    _O("log-file", "N", "<file>", "Logging",
       "Writes the standard-error log to this file instead; %d in the name becomes the "
       "date (YYYYMMDD) and a new file is started each day. Not affected by "
       "--close-stderr.", kind="path"),
    _O("log-time", "L", None, "Logging",
       "Adds the local time to each log line."),
    _O("no-syslog", "n", None, "Logging",
       "Does not log to syslog."),
    _O("syslog", "k", "[<facility>]", "Logging",
       "Logs to syslog even with --no-syslog, with the given facility (default mail).",
       kind="optional"),
    _O("close-stderr", "e", None, "Logging",
       "Closes the standard error stream soon after start-up."),
]
del _O

BY_NAME = {o.name: o for o in OPTIONS}
BY_SHORT = {o.short: o for o in OPTIONS if o.short}

# Options that other options stand for (E-MailRelay's "equivalent to").
IMPLIED = {
    "as-server": ("log", "close-stderr"),
    "as-client": ("log", "no-syslog", "no-daemon", "dont-serve", "forward"),
    "as-proxy": ("log", "close-stderr", "forward-on-disconnect"),
}
