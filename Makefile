# emailrelay for Python: test, install, zipapp and man page.
#
#   make test      install what the tests need, run the suite on python3 and 3.8
#   make install   PREFIX=/usr/local DESTDIR= (package, launchers, man, etc files)
#   make zipapp    build emailrelay.pyz (ZIPAPP=path to put it elsewhere)
#   make man       regenerate man/emailrelay.1 from the option table

PYTHON ?= python3
PREFIX ?= /usr/local
DESTDIR ?=
ZIPAPP ?= emailrelay.pyz
LIBDIR = $(PREFIX)/lib/emailrelay
SBINDIR = $(PREFIX)/sbin
MANDIR = $(PREFIX)/share/man/man1
TOOLS = submit passwd resubmit filter-copy

.PHONY: test install zipapp man clean

test:
	bash tests/install-deps.sh
	$(PYTHON) -m pytest -q tests
	vermin -t=3.8- --no-tips --violations emailrelay emailrelay.py bin
	@if command -v pyenv >/dev/null 2>&1; then \
		py38=$$(pyenv prefix 3.8.18 2>/dev/null || pyenv prefix $$(pyenv versions --bare | grep '^3\.8\.' | sort -V | tail -1)); \
		echo "== python 3.8: $$py38"; \
		$$py38/bin/python3 -m pytest -q tests; \
	else \
		echo "pyenv not found: the suite ran on $(PYTHON) only"; \
	fi

install:
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR) $(DESTDIR)/etc
	rm -rf $(DESTDIR)$(LIBDIR)/emailrelay
	cp -R emailrelay $(DESTDIR)$(LIBDIR)/emailrelay
	find $(DESTDIR)$(LIBDIR) -name __pycache__ -prune -exec rm -rf {} +
	for tool in "emailrelay main" $(TOOLS); do \
		set -- $$tool; \
		if [ "$$1" = emailrelay ]; then name=emailrelay; module=main; \
		else name=emailrelay-$$1; module=tools.$$(echo $$1 | tr - _); fi; \
		printf '#!/usr/bin/env python3\n"""%s: installed by make install."""\nimport sys\nsys.path.insert(0, "%s")\nfrom emailrelay.%s import run\nraise SystemExit(run())\n' \
			"$$name" "$(LIBDIR)" "$$module" > $(DESTDIR)$(SBINDIR)/$$name; \
	done
	chmod 755 $(DESTDIR)$(SBINDIR)/emailrelay*
	for page in man/*.1; do install -m 644 $$page $(DESTDIR)$(MANDIR)/; done
	install -m 644 etc/emailrelay.conf $(DESTDIR)/etc/emailrelay.conf.example
	install -d $(DESTDIR)$(PREFIX)/lib/systemd/system
	install -m 644 etc/emailrelay.service $(DESTDIR)$(PREFIX)/lib/systemd/system/emailrelay.service

zipapp:
	rm -rf $(ZIPAPP).build
	mkdir -p $(ZIPAPP).build
	cp -R emailrelay $(ZIPAPP).build/emailrelay
	find $(ZIPAPP).build -name __pycache__ -prune -exec rm -rf {} +
	# zipapp's own -m entry ignores run()'s return value: write __main__.py
	# so that the exit status gets through.
	printf 'from emailrelay.main import run\nraise SystemExit(run())\n' > $(ZIPAPP).build/__main__.py
	$(PYTHON) -m zipapp $(ZIPAPP).build -o $(ZIPAPP) -p '/usr/bin/env python3'
	rm -rf $(ZIPAPP).build

man:
	$(PYTHON) -c 'import sys; from emailrelay import usage; sys.stdout.write(usage.man_page())' > man/emailrelay.1.tmp
	mv man/emailrelay.1.tmp man/emailrelay.1

clean:
	rm -rf emailrelay.pyz emailrelay.pyz.build .pytest_cache build dist *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
