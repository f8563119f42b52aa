"""The metadata, link-local and other built-in-denied hosts the egress tests try."""

from __future__ import annotations

# Every way a URL can spell a metadata endpoint (host as httpx reports it), and the rule.
METADATA_FORMS = [
    ("169.254.169.254", "metadata"),
    ("2852039166", "metadata"),  # decimal
    ("0251.0376.0251.0376", "metadata"),  # octal
    ("025177524776", "metadata"),  # one octal number
    ("0xa9fea9fe", "metadata"),  # hex
    ("0xa9.0xfe.0xa9.0xfe", "metadata"),  # hex per byte
    ("0251.0xfe.43518", "metadata"),  # mixed, short form
    ("169.254.43518", "metadata"),  # short form
    ("169.254.169.254.", "metadata"),  # trailing dot
    ("::ffff:169.254.169.254", "metadata"),  # IPv4-mapped IPv6
    ("::ffff:a9fe:a9fe", "metadata"),  # the same, in hex
    ("[::ffff:169.254.169.254]", "metadata"),  # bracketed
    ("::169.254.169.254", "metadata"),  # IPv4-compatible IPv6
    ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64
    ("2002:a9fe:a9fe::1", "metadata"),  # 6to4
    ("fd00:ec2::254", "metadata"),  # AWS IPv6
    ("FD00:EC2::254", "metadata"),
    ("100.100.100.200", "metadata"),  # Alibaba
    ("metadata.google.internal", "metadata"),
    ("METADATA.Google.Internal", "metadata"),  # mixed case
    ("metadata.google.internal.", "metadata"),  # trailing dot
    ("Metadata", "metadata"),
    ("instance-data.ec2.internal", "metadata"),
    ("169.254.1.1", "link_local"),
    ("fe80::1%eth0", "link_local"),
    ("0.0.0.0", "unspecified"),
    ("0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
]
