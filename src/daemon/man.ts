/**
 * sparsevirtd(8) and sparsevirtd.conf(5), made at build time from the tables `--help` and the
 * configuration loader use (`DAEMON_OPTIONS`, `CONFIG_KEYS`). The document model is the one of
 * sparsevirt(1) (src/cli/man.ts); scripts/gen-docs.mjs writes roff.
 *
 * Inline markup in texts: `**bold**` and `__italic__`.
 */
import type { ManBlock, ManItem, ManPage } from '../man.js';
import { CONFIG_KEYS, RO_SOCKET_NAME, RW_SOCKET_NAME } from './config.js';
import { DAEMON_OPTIONS, HELP_INTRO, packageVersion } from './options.js';
import { UNIT_FILES } from './systemd.js';

export type { ManBlock, ManItem, ManPage };

/** `--listen unix:PATH` → `**--listen** __unix:PATH__`. */
function optionTerm(usage: string): string {
  return usage
    .split(', ')
    .map((u) => {
      const [flag, ...arg] = u.split(' ');
      return `**${flag}**${arg.length ? ` __${arg.join(' ')}__` : ''}`;
    })
    .join(', ');
}

const DEFAULTS_TEXT = 'root: /etc/sparsevirt/sparsevirtd.conf; other users: $XDG_CONFIG_HOME/sparsevirt/sparsevirtd.conf';

export function sparsevirtdManual(): ManPage {
  const options = DAEMON_OPTIONS.map((o) => {
    const help = o.help.replace('${CONFIG}', DEFAULTS_TEXT);
    return { term: optionTerm(o.usage), text: `${help[0]!.toUpperCase()}${help.slice(1)}${o.key ? `. Overrides **${o.key}**.` : '.'}` };
  });
  return {
    name: 'sparsevirtd',
    section: 8,
    title: 'storage daemon speaking libvirt\'s remote protocol, with sparse streams',
    source: `sparsevirt ${packageVersion()}`,
    manual: 'sparsevirt',
    sections: [
      { heading: 'SYNOPSIS', blocks: [{ para: '**sparsevirtd** [__OPTION__]...' }] },
      {
        heading: 'DESCRIPTION',
        blocks: [
          { para: HELP_INTRO.replace(/\s+/g, ' ') },
          { para: `It reads its configuration file (**sparsevirtd.conf**(5)), keeps pool definitions in its state directory, and listens on the unix socket __${RW_SOCKET_NAME}__ in __unix_sock_dir__ (root: __/run/sparsevirt__), optionally on the read-only __${RO_SOCKET_NAME}__ beside it, on TCP and on TLS. Options given on the command line override the file. It runs in the foreground and logs to standard error unless **log_outputs** says otherwise.` },
          { para: `Connections on a read-only socket (__${RO_SOCKET_NAME}__, **--listen unix-ro:**__PATH__, **sparsevirtd-ro.socket**) are read-only whatever the client asks: they list pools and volumes, read their XML and information, and download volumes; everything that writes is refused with libvirt's "operation forbidden: read only access prevents …".` },
        ],
      },
      { heading: 'OPTIONS', blocks: [{ items: options }] },
      {
        heading: 'SIGNALS',
        blocks: [{
          items: [
            { term: '**SIGINT**, **SIGTERM**', text: 'Stop: streams in flight end with an error to their clients, connections and listeners close, socket files the daemon made are removed. A second signal exits at once.' },
            { term: '**SIGHUP**', text: 'Read the configuration file again and apply what can change while running: **log_level**, **log_outputs** (files are reopened, for logrotate), **tls_allowed_dn_list**, **tls_allowed_cn_list**, **key_file**, **cert_file** and **ca_file** (for new TLS connections), **max_clients**, **max_client_transfers**, **keepalive_interval** and **keepalive_count** (for new connections). The log lists what was applied, and warns of changed keys that need a restart (listeners, sockets, **state_dir**); keys given on the command line keep their values. A file that is refused changes nothing: the error is logged with its line and the daemon goes on.' },
          ],
        }],
      },
      {
        heading: 'SYSTEMD',
        blocks: [
          { para: `The package ships ${UNIT_FILES.map((u) => `**${u}**`).join(', ')}. **sparsevirtd --install-units** [**--prefix** __DIR__] writes them to __PREFIX/lib/systemd/system__ (__/usr/local/lib/systemd/system__ by default) with **ExecStart=** running the installed program; then **systemctl daemon-reload** and **systemctl enable --now sparsevirtd.socket sparsevirtd-ro.socket**.` },
          { para: 'Socket activation: sparsevirtd takes the listening sockets systemd passes (**LISTEN_FDS**, **LISTEN_PID**, **LISTEN_FDNAMES**, see **sd_listen_fds**(3)). It tells them apart by name (**FileDescriptorName=**): __sparsevirtd.socket__ is the read-write unix socket, a name ending in __-ro__ (__sparsevirtd-ro.socket__) read-only, in __-tcp__ plain TCP, in __-tls__ TLS. A kind of socket systemd passes replaces the configured listeners of that kind; the others are opened as configured. The unix_sock_* modes and group do not apply to sockets systemd made: the socket units\' **SocketMode=** and **SocketGroup=** do.' },
          { para: 'Readiness: the service is **Type=notify**. Once every listener is up, sparsevirtd sends **READY=1** to **NOTIFY_SOCKET** (and **RELOADING=1**, **READY=1** around a reload, **STOPPING=1** at a stop) through **systemd-notify**(1), which sends in the daemon\'s name; the unit sets **NotifyAccess=all** as well.' },
          { para: 'Logging: under systemd (**JOURNAL_STREAM** names standard error) log lines carry an sd-daemon priority prefix (**<3>** error, **<4>** warning, **<6>** info, **<7>** debug) and no timestamp; otherwise they are JSON objects, one per line.' },
          { para: 'The service is hardened (**ProtectSystem=strict**, **PrivateTmp=yes**, **ProtectHome=yes**, **NoNewPrivileges=yes**, …): it may write its state, runtime and log directories only. Pools elsewhere need **ReadWritePaths=** in a drop-in (**systemctl edit sparsevirtd.service**).' },
        ],
      },
      {
        heading: 'FILES',
        blocks: [{
          items: [
            { term: '__/etc/sparsevirt/sparsevirtd.conf__', text: 'The configuration file (root); **sparsevirtd.conf**(5).' },
            { term: '__/var/lib/sparsevirt__', text: 'The state directory (root), with __sparsevirtd.pid__, held locked while the daemon runs.' },
            { term: `__/run/sparsevirt/${RW_SOCKET_NAME}__, __/run/sparsevirt/${RO_SOCKET_NAME}__`, text: 'The unix sockets (root).' },
          ],
        }],
      },
      {
        heading: 'EXIT STATUS',
        blocks: [{ para: '0: stopped cleanly. 1: failed to start or stopped on an error. 2: bad command line. 78 (EX_CONFIG): the configuration was refused; the unit does not restart on it (**RestartPreventExitStatus=78**).' }],
      },
      {
        heading: 'ENVIRONMENT',
        blocks: [{
          items: [
            { term: '**LISTEN_FDS**, **LISTEN_PID**, **LISTEN_FDNAMES**', text: 'Socket activation (see SYSTEMD).' },
            { term: '**NOTIFY_SOCKET**', text: 'Readiness notification (see SYSTEMD).' },
            { term: '**JOURNAL_STREAM**', text: 'Standard error is the journal: **<N>** lines.' },
            { term: '**XDG_CONFIG_HOME**, **XDG_STATE_HOME**, **XDG_RUNTIME_DIR**', text: 'The defaults of users other than root.' },
          ],
        }],
      },
      { heading: 'SEE ALSO', blocks: [{ para: '**sparsevirtd.conf**(5), **sparsevirt**(1), **virsh**(1), **libvirtd**(8), **systemd.socket**(5), **sd_notify**(3)' }] },
    ],
  };
}

export function sparsevirtdConfManual(): ManPage {
  const keys: ManItem[] = CONFIG_KEYS.map((k) => ({
    term: `**${k.name}** (${k.type})`,
    text: `${k.doc} Default: ${k.default}. ${k.reload ? 'SIGHUP applies a change.' : 'A change needs a restart.'}`,
  }));
  return {
    name: 'sparsevirtd.conf',
    section: 5,
    title: 'configuration file of sparsevirtd',
    source: `sparsevirt ${packageVersion()}`,
    manual: 'sparsevirt',
    sections: [
      { heading: 'SYNOPSIS', blocks: [{ para: '__/etc/sparsevirt/sparsevirtd.conf__ (root), __$XDG_CONFIG_HOME/sparsevirt/sparsevirtd.conf__ (other users), or the file of **sparsevirtd --config** __FILE__' }] },
      {
        heading: 'DESCRIPTION',
        blocks: [
          { para: '**sparsevirtd**(8) reads this file at start and again on SIGHUP. Its syntax is libvirtd.conf\'s, and its keys are named after libvirtd\'s where libvirtd has one. Options on sparsevirtd\'s command line override keys of the file. A missing default file is no error (the defaults apply); a file named with **--config** must exist.' },
          { para: 'A file that cannot be read, or with a syntax error, an unknown key, a key set twice, a value of the wrong type or out of range, is refused: sparsevirtd does not start (exit status 78) and says where and why, as __FILE__:__LINE__: __reason__. **sparsevirtd --check-config** reports the same without starting.' },
        ],
      },
      {
        heading: 'SYNTAX',
        blocks: [
          { para: 'One **key = value** statement per line (or several separated by **;**). **#** starts a comment, on a line of its own or after a value. Values are integers (**1**, **-1**), strings in double or single quotes on one line, without escapes (**"text"**), strings in triple double quotes over several lines, and lists of strings in brackets, over several lines if need be, with an optional trailing comma. Booleans are the integers 0 and 1.' },
          { pre: '# a comment\nlisten_tls = 1\ntls_port = "16514"\ntls_allowed_dn_list = [\n    "C=GB,O=Example,CN=backup-*",   # the backup hosts\n    "C=GB,O=Example,CN=admin",\n]' },
        ],
      },
      { heading: 'KEYS', blocks: [{ items: keys }] },
      {
        heading: 'EXAMPLE',
        blocks: [{
          pre: [
            '# /etc/sparsevirt/sparsevirtd.conf',
            'unix_sock_group = "sparsevirt"',
            'unix_sock_rw_perms = "0660"',
            'unix_sock_ro = 1',
            'unix_sock_ro_perms = "0660"',
            'listen_tls = 1',
            'listen_addr = "192.0.2.10"',
            'tls_allowed_dn_list = [ "O=Example,CN=*.backup.example.org" ]',
            'log_level = 2',
            'log_outputs = "3:journald 2:file:/var/log/sparsevirt/sparsevirtd.log"',
            'max_client_transfers = 8',
          ].join('\n'),
        }],
      },
      { heading: 'SEE ALSO', blocks: [{ para: '**sparsevirtd**(8), **sparsevirt**(1), **libvirtd**(8)' }] },
    ],
  };
}
