"""emailrelay: a store-and-forward SMTP relay, SMTP proxy and POP3 server.

A Python version of E-MailRelay using only the standard library. The program
starts in `emailrelay.main.run`; this package file holds only the version so
that importing the package stays cheap.
"""

__version__ = "2.5.0"
