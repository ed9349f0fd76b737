# emailrelay for Python: test, install, zipapp and man page.
#
#   make test      install what the tests need, run the suite on python3 and 3.8, lint
#   make install   the package, launchers, man pages, config, spool and systemd units
#   make zipapp    build emailrelay.pyz (ZIPAPP=path to put it elsewhere)
#   make man       regenerate man/emailrelay.8 from the option table
#
# make install variables (all may be given on the command line):
#   PREFIX=/usr/local      where the package, launchers and man pages go
#   DESTDIR=               a staging root (packaging); nothing is run from it
#   SYSCONFDIR             emailrelay.conf: /etc when PREFIX=/usr, else $(PREFIX)/etc
#   SPOOLDIR=/var/spool/emailrelay   created owned by RUNUSER, mode 0770
#   LOGDIR=/var/log/emailrelay       created for --log-file, mode 0750; the units
#                          name it in LogsDirectory=, so it stays under /var/log
#   RUNUSER=daemon         the --user the program switches to (and spool owner)
#   SYSTEMDDIR             the units' directory: $(PREFIX)/lib/systemd/system
#   PPPDIR=/etc/ppp        where pppd looks for ip-up.d/ (whatever the PREFIX)
#   LOGROTATEDIR=/etc/logrotate.d    where logrotate looks (whatever the PREFIX)
#   SENDMAIL=no            yes: also link sendmail and mailq to emailrelay-sendmail
#                          where cron and mailx look (replacing what is there):
#   SENDMAILDIR=/usr/sbin  the sendmail link's directory
#   MAILQDIR=/usr/bin      the mailq link's directory
#   PYTHON                 the interpreter named by the launchers' #! line when
#                          given (a name is looked up on PATH); else /usr/bin/python3
#   PYTHONSITE             where emailrelay.pth goes so that "python3 -m emailrelay"
#                          finds the package: that interpreter's own site directory,
#                          but none with DESTDIR (a package must not carry a path of
#                          the build host's Python); empty: none

PYTHON ?= python3
PREFIX ?= /usr/local
DESTDIR ?=
ZIPAPP ?= emailrelay.pyz
SYSCONFDIR ?= $(if $(filter /usr,$(PREFIX)),/etc,$(PREFIX)/etc)
SPOOLDIR ?= /var/spool/emailrelay
LOGDIR ?= /var/log/emailrelay
RUNUSER ?= daemon
SYSTEMDDIR ?= $(PREFIX)/lib/systemd/system
PPPDIR ?= /etc/ppp
LOGROTATEDIR ?= /etc/logrotate.d
SENDMAIL ?= no
SENDMAILDIR ?= /usr/sbin
MAILQDIR ?= /usr/bin
LAUNCHER_PYTHON = $(if $(filter file,$(origin PYTHON)),/usr/bin/python3,$(shell command -v $(PYTHON)))
PYTHONSITE ?= $(if $(DESTDIR),,$(shell $(LAUNCHER_PYTHON) -c 'import sysconfig; print(sysconfig.get_path("purelib"))' 2>/dev/null))
LIBDIR = $(PREFIX)/lib/emailrelay
SBINDIR = $(PREFIX)/sbin
MANDIR = $(PREFIX)/share/man/man8
UNITSUBST = -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' \
	-e 's|@SPOOLDIR@|$(SPOOLDIR)|g' -e 's|@RUNUSER@|$(RUNUSER)|g' \
	-e 's|@LOGSDIRECTORY@|$(patsubst /var/log/%,%,$(LOGDIR))|g'
TOOLS = submit passwd resubmit filter-copy sendmail
# What flake8 checks (pyflakes and pycodestyle; settings in setup.cfg).
LINTED = emailrelay tests bin emailrelay.py setup.py bench/forward bench/ingest bench/filters bench/c10k bench/sync-orders

.PHONY: test install zipapp man clean

test:
	bash tests/install-deps.sh
	$(PYTHON) -m pytest -q tests
	vermin -t=3.8- --no-tips --violations emailrelay emailrelay.py bin
	$(PYTHON) -m flake8 $(LINTED)
	@if command -v pyenv >/dev/null 2>&1; then \
		py38=$$(pyenv prefix 3.8.18 2>/dev/null || pyenv prefix $$(pyenv versions --bare | grep '^3\.8\.' | sort -V | tail -1)); \
		echo "== python 3.8: $$py38"; \
		$$py38/bin/python3 -m pytest -q tests; \
	else \
		echo "pyenv not found: the suite ran on $(PYTHON) only"; \
	fi

install:
	@[ -n "$(LAUNCHER_PYTHON)" ] || { echo "make install: PYTHON=$(PYTHON): no such interpreter" >&2; exit 1; }
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR) \
		$(DESTDIR)$(SYSCONFDIR) $(DESTDIR)$(SYSTEMDDIR)
	rm -rf $(DESTDIR)$(LIBDIR)/emailrelay
	cp -R emailrelay $(DESTDIR)$(LIBDIR)/emailrelay
	find $(DESTDIR)$(LIBDIR) -name __pycache__ -prune -exec rm -rf {} +
	for tool in "emailrelay main" $(TOOLS); do \
		set -- $$tool; \
		if [ "$$1" = emailrelay ]; then name=emailrelay; module=main; \
		else name=emailrelay-$$1; module=tools.$$(echo $$1 | tr - _); fi; \
		printf '#!%s\n"""%s: installed by make install."""\nimport sys\nsys.path.insert(0, "%s")\nfrom emailrelay.main import entry\nfrom emailrelay.%s import run\nraise SystemExit(entry(run))\n' \
			"$(LAUNCHER_PYTHON)" "$$name" "$(LIBDIR)" "$$module" > $(DESTDIR)$(SBINDIR)/$$name; \
	done
	chmod 755 $(DESTDIR)$(SBINDIR)/emailrelay*
	if [ "$(SENDMAIL)" = yes ]; then \
		install -d $(DESTDIR)$(SENDMAILDIR) $(DESTDIR)$(MAILQDIR); \
		ln -sf $(SBINDIR)/emailrelay-sendmail $(DESTDIR)$(SENDMAILDIR)/sendmail; \
		ln -sf $(SBINDIR)/emailrelay-sendmail $(DESTDIR)$(MAILQDIR)/mailq; fi
	if [ -n "$(PYTHONSITE)" ]; then \
		install -d $(DESTDIR)$(PYTHONSITE) && echo "$(LIBDIR)" > $(DESTDIR)$(PYTHONSITE)/emailrelay.pth; fi
	for page in man/*.8; do install -m 644 $$page $(DESTDIR)$(MANDIR)/; done
	install -m 644 etc/emailrelay.conf $(DESTDIR)$(SYSCONFDIR)/emailrelay.conf.example
	if [ ! -e $(DESTDIR)$(SYSCONFDIR)/emailrelay.conf ]; then \
		sed -e 's|@SPOOLDIR@|$(SPOOLDIR)|g' -e 's|@RUNUSER@|$(RUNUSER)|g' \
			etc/emailrelay.conf.minimal > $(DESTDIR)$(SYSCONFDIR)/emailrelay.conf; \
		chmod 644 $(DESTDIR)$(SYSCONFDIR)/emailrelay.conf; fi
	sed $(UNITSUBST) etc/emailrelay.service.in > $(DESTDIR)$(SYSTEMDDIR)/emailrelay.service
	sed $(UNITSUBST) etc/emailrelay@.service.in > $(DESTDIR)$(SYSTEMDDIR)/emailrelay@.service
	install -m 644 etc/emailrelay.socket $(DESTDIR)$(SYSTEMDDIR)/emailrelay.socket
	chmod 644 $(DESTDIR)$(SYSTEMDDIR)/emailrelay.service $(DESTDIR)$(SYSTEMDDIR)/emailrelay@.service
	install -d $(DESTDIR)$(LOGROTATEDIR) $(DESTDIR)$(PPPDIR)/ip-up.d
	sed -e 's|@LOGDIR@|$(LOGDIR)|g' etc/logrotate.emailrelay > $(DESTDIR)$(LOGROTATEDIR)/emailrelay
	chmod 644 $(DESTDIR)$(LOGROTATEDIR)/emailrelay
	sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@SPOOLDIR@|$(SPOOLDIR)|g' etc/ip-up.emailrelay \
		> $(DESTDIR)$(PPPDIR)/ip-up.d/emailrelay
	chmod 755 $(DESTDIR)$(PPPDIR)/ip-up.d/emailrelay
	install -d -m 0750 $(DESTDIR)$(LOGDIR)
	install -d -m 0770 $(DESTDIR)$(SPOOLDIR)
	chown $(RUNUSER): $(DESTDIR)$(SPOOLDIR) 2>/dev/null || \
		echo "make install: warning: cannot give $(DESTDIR)$(SPOOLDIR) to user $(RUNUSER): do it as root" >&2
	chmod 0770 $(DESTDIR)$(SPOOLDIR)

zipapp:
	rm -rf $(ZIPAPP).build
	mkdir -p $(ZIPAPP).build
	cp -R emailrelay $(ZIPAPP).build/emailrelay
	find $(ZIPAPP).build -name __pycache__ -prune -exec rm -rf {} +
	# zipapp's own -m entry ignores run()'s return value: write __main__.py
	# so that the exit status gets through.
	printf 'from emailrelay.main import entry\nraise SystemExit(entry())\n' > $(ZIPAPP).build/__main__.py
	$(PYTHON) -m zipapp $(ZIPAPP).build -o $(ZIPAPP) -p '/usr/bin/env python3'
	rm -rf $(ZIPAPP).build

man:
	$(PYTHON) -c 'import sys; from emailrelay.config import usage; sys.stdout.write(usage.man_page())' > man/emailrelay.8.tmp
	mv man/emailrelay.8.tmp man/emailrelay.8

clean:
	rm -rf emailrelay.pyz emailrelay.pyz.build .pytest_cache build dist *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
