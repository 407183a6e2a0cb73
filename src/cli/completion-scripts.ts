/**
 * The shell completion scripts for sparsevirt, generated from the command table (`commands.ts`)
 * and the global options' usage text (`globals.ts`), at build time (scripts/gen-docs.mjs writes
 * dist/completion/sparsevirt.bash and dist/completion/_sparsevirt):
 *
 * - bash: `_sparsevirt`, registered with `complete -o default`. Command names, global options
 *   and a command's option names are completed from the tables in the script; everything else
 *   (pool and volume names, fixed values) by `sparsevirt [-c URI] [-r] complete -- WORDS…`; no
 *   candidate lets bash complete file names.
 * - zsh: the same, with the commands' and options' help texts as descriptions.
 */
import { GROUPS } from './commands.js';
import { USAGE } from './globals.js';

export interface GlobalOption {
  short?: string;
  long?: string;
  /** The argument's name (`URI`); absent: a flag. */
  arg?: string;
  /** `--version[=TYPE]`: the argument is optional and only given with `=`. */
  optionalArg?: boolean;
  help: string;
}

/** The global options, read from the usage text `-h` prints (one source for both). */
export function globalOptions(): GlobalOption[] {
  const out: GlobalOption[] = [];
  const body = USAGE.slice(USAGE.indexOf('options:'), USAGE.indexOf('commands (non interactive mode)'));
  for (const line of body.split('\n').slice(1)) {
    if (!line.trim()) continue;
    const m = /^\s{4}(?:(-[A-Za-z])\s*(?:\|\s*)?)?\s*(--[a-z-]+)?(\[=[A-Z]+\]|=[A-Z]+| <[a-z]+>)?\s*(.*)$/.exec(line);
    if (m && (m[1] || m[2])) {
      const arg = m[3] ? m[3].replace(/[[\]=<> ]/g, '') : undefined;
      out.push({
        ...(m[1] ? { short: m[1] } : {}),
        ...(m[2] ? { long: m[2] } : {}),
        ...(arg ? { arg } : {}),
        ...(m[3]?.startsWith('[') ? { optionalArg: true } : {}),
        help: m[4]!.trim(),
      });
    } else if (out.length > 0) {
      const last = out[out.length - 1]!;
      last.help = `${last.help} ${line.trim()}`.trim();
    }
  }
  return out;
}

/** The global options that take the next word as their value (for skipping it). */
function valueOptions(): string[] {
  return globalOptions()
    .filter((o) => o.arg && !o.optionalArg && o.long !== '--connect')
    .flatMap((o) => [o.short, o.long])
    .filter((x): x is string => !!x);
}

function flagNames(): string[] {
  return globalOptions().flatMap((o) => [o.short, o.long]).filter((x): x is string => !!x);
}

/** POSIX shell single quotes. */
function sq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function commands() {
  return GROUPS.flatMap((g) => g.commands);
}

export function bashCompletion(): string {
  const cmds = commands();
  const optLines = cmds.filter((c) => c.opts.length > 0).map((c) => `  [${c.name}]=${sq(c.opts.map((o) => `--${o.name}`).join(' '))}`);
  const withValue = valueOptions();
  return `# bash completion for sparsevirt, generated from its command table (see sparsevirt(1)).
# Install: copy to /usr/share/bash-completion/completions/sparsevirt, or source it.

_sparsevirt_commands=${sq(cmds.map((c) => c.name).join(' '))}
_sparsevirt_global_options=${sq(flagNames().join(' '))}
declare -gA _sparsevirt_options=(
${optLines.join('\n')}
)

# The shell words up to the cursor: COMP_WORDS split "--pool=x" and URIs at = and :
# (COMP_WORDBREAKS); pieces with no blank between them in COMP_LINE are one word again.
_sparsevirt_words() {
  local i w rest=\${COMP_LINE:0:\${COMP_POINT:-\${#COMP_LINE}}} j=-1
  _sv_words=()
  _sv_cword=0
  for ((i = 0; i < \${#COMP_WORDS[@]}; i++)); do
    w=\${COMP_WORDS[i]}
    if [[ -n \${COMP_LINE-} && $i -gt 1 && $rest != [[:blank:]]* && $j -ge 0 ]]; then
      _sv_words[j]+=$w
    else
      _sv_words+=("$w")
      j=$((j + 1))
    fi
    rest=\${rest#"\${rest%%[![:blank:]]*}"}
    rest=\${rest#"$w"}
    ((i == COMP_CWORD)) && _sv_cword=$j
    ((i == COMP_CWORD)) && break
  done
}

_sparsevirt() {
  local prog=\${COMP_WORDS[0]/#\\~/$HOME}
  local -a _sv_words
  local _sv_cword
  _sparsevirt_words
  local cur=\${_sv_words[_sv_cword]} i=1 w cmdi=-1 c
  local -a global=() cands=()
  while ((i < _sv_cword)); do
    w=\${_sv_words[i]}
    case $w in
      -c|--connect) global+=(-c "\${_sv_words[i + 1]}"); i=$((i + 2)); continue ;;
      --connect=*) global+=(-c "\${w#--connect=}") ;;
      ${withValue.join('|')}) i=$((i + 2)); continue ;;
      -r|--readonly) global+=(-r) ;;
      -*) ;;
      *) cmdi=$i; break ;;
    esac
    i=$((i + 1))
  done
  if ((cmdi < 0)); then
    if [[ $cur == -* ]]; then
      mapfile -t cands < <(compgen -W "$_sparsevirt_global_options" -- "$cur")
    else
      mapfile -t cands < <(compgen -W "$_sparsevirt_commands" -- "$cur")
    fi
  elif [[ $cur == --* && $cur != *=* && -n \${_sparsevirt_options[\${_sv_words[cmdi]}]-} ]]; then
    local seen=" \${_sv_words[*]:cmdi:_sv_cword-cmdi} "
    for c in \${_sparsevirt_options[\${_sv_words[cmdi]}]}; do
      [[ $c == "$cur"* && $seen != *" $c "* && $seen != *" $c="* ]] && cands+=("$c")
    done
  else
    mapfile -t cands < <("$prog" "\${global[@]}" complete -- "\${_sv_words[@]:cmdi:_sv_cword-cmdi+1}" 2>/dev/null </dev/null)
  fi
  # Candidates complete the whole word; bash replaces only its own last piece of it.
  local piece=\${COMP_WORDS[COMP_CWORD]}
  local lead=\${cur%"$piece"}
  COMPREPLY=()
  for c in "\${cands[@]}"; do
    [[ $c == "$lead"* ]] && COMPREPLY+=("\${c#"$lead"}")
  done
  return 0
}

complete -o default -F _sparsevirt sparsevirt
`;
}

/** zsh's _describe entries: `name:description`, colons in the name escaped. */
function described(name: string, help: string): string {
  return sq(`${name.replace(/:/g, '\\:')}:${help}`);
}

export function zshCompletion(): string {
  const cmds = commands();
  const globals = globalOptions();
  const optHelp = cmds.flatMap((c) => c.opts.map((o) => `  ${sq(`${c.name} --${o.name}`)} ${sq(o.help || o.name)}`));
  return `#compdef sparsevirt
# zsh completion for sparsevirt, generated from its command table (see sparsevirt(1)).
# Install: copy to a directory of $fpath (e.g. /usr/local/share/zsh/site-functions) as _sparsevirt.

typeset -ga _sparsevirt_commands=(
${cmds.map((c) => `  ${described(c.name, c.help)}`).join('\n')}
)
typeset -ga _sparsevirt_global_options=(
${globals.flatMap((o) => [o.short, o.long].filter(Boolean).map((n) => `  ${described(n!, o.help)}`)).join('\n')}
)
typeset -gA _sparsevirt_option_help=(
${optHelp.join('\n')}
)

_sparsevirt() {
  local i=2 w cmdi=0 c
  local -a global out options plain
  while (( i < CURRENT )); do
    w=$words[i]
    case $w in
      (-c|--connect) global+=(-c "$words[i+1]"); (( i += 2 )); continue ;;
      (--connect=*) global+=(-c "\${w#--connect=}") ;;
      (${valueOptions().join('|')}) (( i += 2 )); continue ;;
      (-r|--readonly) global+=(-r) ;;
      (-*) ;;
      (*) cmdi=$i; break ;;
    esac
    (( i++ ))
  done
  if (( cmdi == 0 )); then
    if [[ $PREFIX == -* ]]; then
      _describe -t options 'global option' _sparsevirt_global_options
    else
      _describe -t commands 'sparsevirt command' _sparsevirt_commands
    fi
    return
  fi
  out=( \${(f)"$(\${words[1]/#\\~/$HOME} "\${global[@]}" complete -- "\${(@)words[cmdi,CURRENT]}" 2>/dev/null </dev/null)"} )
  if (( \${#out} == 0 )); then
    _files
    return
  fi
  for c in $out; do
    if [[ $c == --* && $c != *=* && -n \${_sparsevirt_option_help[$words[cmdi] $c]-} ]]; then
      options+=("\${c//:/\\\\:}:\${_sparsevirt_option_help[$words[cmdi] $c]}")
    else
      plain+=("$c")
    fi
  done
  (( \${#options} )) && _describe -t options 'option' options
  (( \${#plain} )) && compadd -Q -a plain
  return 0
}

if [[ \${zsh_eval_context[-1]-} == loadautofunc ]]; then
  _sparsevirt "$@"
else
  compdef _sparsevirt sparsevirt
fi
`;
}
