//! Plain-text tables and `Key: value` blocks for the client's table output, aligned by hand.
//! Every cell is cleaned of control characters (a BMC's error text must not move the
//! cursor or break a row) and cut to its column's width with an ellipsis.

/// A table being built: headings, the widest a cell of each column may be, and rows.
#[derive(Debug)]
pub struct Table {
    columns: Vec<(&'static str, usize)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns: each a heading and the most characters its cells show.
    pub fn new(columns: &[(&'static str, usize)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; an empty cell shows as `-`, a long one is cut with `…`.
    pub fn row<S: AsRef<str>>(&mut self, cells: &[S]) {
        debug_assert_eq!(cells.len(), self.columns.len(), "one cell per column");
        let row = self
            .columns
            .iter()
            .zip(cells)
            .map(|((_, max), cell)| fit(cell.as_ref(), *max))
            .collect();
        self.rows.push(row);
    }

    /// The table, heading line first, columns two spaces apart, no trailing blanks.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.columns.iter().map(|(h, _)| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let headings: Vec<String> = self.columns.iter().map(|(h, _)| (*h).to_owned()).collect();
        let mut out = String::new();
        for row in std::iter::once(&headings).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - width(cell)));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `Key: value` lines with the values aligned; values are cleaned but never cut (they are
/// not in a column that could push others out of line). An empty value shows as `-`.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let key_width = pairs.iter().map(|(k, _)| width(k)).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in pairs {
        let value = clean(value);
        let value = if value.is_empty() { "-" } else { &value };
        let key = format!("{key}:");
        out.push_str(&format!("{key:<key_width$}  {value}\n"));
    }
    out
}

/// A cell: cleaned, `-` when empty, and at most `max` characters, the last one `…` when
/// something was cut (right after the last word kept, not after a blank).
pub fn fit(text: &str, max: usize) -> String {
    let text = clean(text);
    if text.is_empty() {
        return "-".to_owned();
    }
    if width(&text) <= max {
        return text;
    }
    let cut: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{}…", cut.trim_end())
}

/// The text with every control character (newlines, tabs, escape sequences) made a space
/// and the ends trimmed.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// How many columns `text` takes, counted in characters (no wide-character tables: names
/// and ids here are ASCII in practice, and a miscount only shifts one row).
fn width(text: &str) -> usize {
    text.chars().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_long_cells_are_cut() {
        let mut t = Table::new(&[("NAME", 20), ("STATE", 10), ("ERROR", 12)]);
        t.row(&["reboot", "failed", "the BMC said no, twice"]);
        t.row(&["a", "succeeded", ""]);
        t.row(&["line\nbreak", "x\x1b[31m", "tab\there"]);
        assert_eq!(
            t.render(),
            "NAME        STATE      ERROR\n\
             reboot      failed     the BMC sai…\n\
             a           succeeded  -\n\
             line break  x [31m     tab here\n"
        );
    }

    #[test]
    fn fields_align_keys() {
        assert_eq!(
            fields(&[
                ("Id", "w1".into()),
                ("Status", "".into()),
                ("Error", "a\nb".into())
            ]),
            "Id:      w1\nStatus:  -\nError:   a b\n"
        );
    }

    #[test]
    fn fit_counts_characters_not_bytes() {
        assert_eq!(fit("ééééé", 5), "ééééé");
        assert_eq!(fit("éééééé", 5), "éééé…");
        assert_eq!(fit("  ", 5), "-");
        assert_eq!(fit("ab cd", 4), "ab…");
    }
}
