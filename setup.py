"""Optional setuptools packaging; nothing needs it (see `make install`)."""

import re

from setuptools import find_packages, setup

with open("emailrelay/__init__.py") as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="emailrelay",
    version=VERSION,
    description="Store-and-forward SMTP relay, SMTP proxy and POP3 server (E-MailRelay compatible)",
    packages=find_packages(include=["emailrelay", "emailrelay.*"]),
    python_requires=">=3.8",
    data_files=[("share/man/man8", ["man/emailrelay.8"])],
    entry_points={"console_scripts": [
        "emailrelay=emailrelay.main:run",
        "emailrelay-submit=emailrelay.tools.submit:run",
        "emailrelay-passwd=emailrelay.tools.passwd:run",
        "emailrelay-resubmit=emailrelay.tools.resubmit:run",
        "emailrelay-filter-copy=emailrelay.tools.filter_copy:run",
    ]},
)
